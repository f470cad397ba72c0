//! `kennel retention` beside Kubernetes' own StatefulSet PVC retention (on
//! by default in 1.28): Kennel must detect it, stay passive where it acts
//! and never fight it.

mod cluster_support;

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
            ("builtin-on-detected", builtin_on_detected),
            ("builtin-acts-kennel-passive", builtin_acts_kennel_passive),
        ],
    );
}

fn builtin_on_detected(cluster: &mut Cluster) {
    start_retention(cluster);
    let log = retention_log(cluster);
    assert!(
        log.contains("rule=WhereFieldKept"),
        "on v1.28 (gate beta, on by default) --builtin-retention auto must leave sets whose policy field the API server keeps to Kubernetes:\n{log}"
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
        "the API server keeps the policy field with the gate on"
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
