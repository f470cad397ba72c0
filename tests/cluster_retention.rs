//! `kennel retention` against the real StatefulSet controller and garbage
//! collector, with Kubernetes' own PVC retention turned off
//! (`StatefulSetAutoDeletePVC=false`: the API server drops the spec field,
//! so Kennel's annotations drive the policy), and node loss on a node that
//! is replaced.

mod cluster_support;

use std::time::Duration;

use cluster_support::procs::wait_for;
use cluster_support::retention::*;
use cluster_support::workload::*;
use cluster_support::{run_scenarios, Backend, Cluster, ClusterOpts, K8s};
use serde_json::json;

const B: Backend = Backend::Loop;

#[test]
fn retention_with_builtin_off() {
    run_scenarios(
        ClusterOpts {
            // Built-in retention can be turned off only before 1.32: the oldest tested release.
            k8s: K8s::V1_28,
            feature_gates: Some("StatefulSetAutoDeletePVC=false".to_owned()),
            node_monitor_grace: Some(Duration::from_secs(15)),
            ..ClusterOpts::default()
        },
        B,
        &[
            ("builtin-off-detected", builtin_off_detected),
            ("when-scaled-delete", when_scaled_delete),
            ("when-deleted-delete", when_deleted_delete),
            ("retain-and-reattach", retain_and_reattach),
            ("restart-mid-scale-down", restart_mid_scale_down),
            ("cordoned-node-is-not-lost", cordoned_node_is_not_lost),
            ("node-loss-node-deleted", node_loss_node_deleted),
            ("node-loss-not-ready", node_loss_not_ready),
        ],
    );
}

/// Apply the set and wait for its pods; returns the namespace.
fn deploy(
    cluster: &mut Cluster,
    scenario: &str,
    set: (serde_json::Value, serde_json::Value),
    replicas: u32,
) -> String {
    if !cluster.extra.iter().any(|d| d.name == "kennel-retention") {
        start_retention(cluster);
    }
    let ns = cluster.namespace(scenario);
    cluster.kubectl.apply(Some(&ns), &set.0);
    let applied = cluster.kubectl.apply(Some(&ns), &set.1);
    assert!(applied.contains("web"), "{applied}");
    wait_pods_ready(cluster, &ns, &ordinals("web", replicas), 240);
    ns
}

fn scale(cluster: &Cluster, ns: &str, replicas: u32) {
    cluster.kubectl.run(&[
        "scale",
        "statefulset",
        "web",
        "-n",
        ns,
        &format!("--replicas={replicas}"),
    ]);
}

fn finish(cluster: &Cluster, ns: &str) {
    cluster
        .kubectl
        .run(&["delete", "statefulset", "--all", "-n", ns, "--wait=false"]);
    cluster
        .kubectl
        .run(&["delete", "pvc", "--all", "-n", ns, "--wait=false"]);
    cluster
        .kubectl
        .run(&["delete", "namespace", ns, "--wait=false"]);
}

fn builtin_off_detected(cluster: &mut Cluster) {
    start_retention(cluster);
    let set = set_with_policy(B, "web", 1, "Retain", "Retain", &[]);
    let ns = deploy(cluster, "builtin-off", set, 1);
    let stored = cluster
        .kubectl
        .get(&["statefulset", "web", "-n", &ns])
        .expect("set");
    assert!(
        stored["spec"]["persistentVolumeClaimRetentionPolicy"].is_null(),
        "with the gate off the API server drops the policy field"
    );
    let log = retention_log(cluster);
    // v1.28: the built-in acts only on sets whose policy field the API
    // server keeps; here it dropped it, so Kennel enforces the annotations.
    assert!(
        log.contains("rule=WhereFieldKept"),
        "Kennel did not detect the built-in retention as off:\n{log}"
    );
    finish(cluster, &ns);
}

fn when_scaled_delete(cluster: &mut Cluster) {
    let set = set_with_policy(B, "web", 3, "Retain", "Delete", &[]);
    let ns = deploy(cluster, "scaled-delete", set, 3);
    let pvs: Vec<String> = (0..3)
        .map(|i| {
            claim_pv(cluster, &ns, &format!("www-web-{i}")).expect("bound")["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    scale(cluster, &ns, 1);
    wait_claims(cluster, &ns, &["www-web-0"], 90);
    // Two actions with the same reason are two events, each naming its claim.
    let owners = events(cluster, &ns, "ClaimOwnersUpdated");
    for claim in ["www-web-1", "www-web-2"] {
        assert!(
            owners.iter().any(|m| m.contains(claim)),
            "no ClaimOwnersUpdated event names {claim}: {owners:?}"
        );
    }
    for pv in &pvs[1..] {
        wait_for(
            &format!("PV {pv} deleted"),
            90,
            || cluster.kubectl.get(&["pv", pv]).is_none().then_some(()),
            || describe(cluster, &ns),
        );
    }
    assert!(
        cluster.kubectl.get(&["pv", &pvs[0]]).is_some(),
        "the kept claim's PV is gone"
    );
    // whenDeleted=Retain: deleting the set keeps the last claim.
    cluster
        .kubectl
        .run(&["delete", "statefulset", "web", "-n", &ns, "--wait=true"]);
    hold_claims(cluster, &ns, &["www-web-0"], 5);
    assert_no_problems(cluster);
    finish(cluster, &ns);
}

fn when_deleted_delete(cluster: &mut Cluster) {
    let set = set_with_policy(B, "web", 2, "Delete", "Retain", &[]);
    let ns = deploy(cluster, "deleted-delete", set, 2);
    scale(cluster, &ns, 1);
    wait_pod_gone(cluster, &ns, "web-1", 60);
    hold_claims(cluster, &ns, &["www-web-0", "www-web-1"], 5);
    cluster
        .kubectl
        .run(&["delete", "statefulset", "web", "-n", &ns, "--wait=false"]);
    wait_claims(cluster, &ns, &[], 90);
    assert_no_problems(cluster);
    finish(cluster, &ns);
}

fn retain_and_reattach(cluster: &mut Cluster) {
    let set = set_with_policy(B, "web", 2, "Retain", "Retain", &[]);
    let ns = deploy(cluster, "retain", set, 2);
    let pv = claim_pv(cluster, &ns, "www-web-1").expect("bound")["metadata"]["name"].clone();
    exec_ok(
        cluster,
        &ns,
        "web-1",
        &["tee", &format!("{WWW}/data")],
        Some(b"kept\n"),
    );
    scale(cluster, &ns, 1);
    wait_pod_gone(cluster, &ns, "web-1", 60);
    hold_claims(cluster, &ns, &["www-web-0", "www-web-1"], 5);
    scale(cluster, &ns, 2);
    wait_pods_ready(cluster, &ns, &ordinals("web", 2), 120);
    let back = claim_pv(cluster, &ns, "www-web-1").expect("bound");
    assert_eq!(
        back["metadata"]["name"], pv,
        "web-1 came back on another volume"
    );
    assert_eq!(
        exec_ok(
            cluster,
            &ns,
            "web-1",
            &["cat", &format!("{WWW}/data")],
            None
        ),
        "kept\n"
    );
    cluster
        .kubectl
        .run(&["delete", "statefulset", "web", "-n", &ns, "--wait=true"]);
    hold_claims(cluster, &ns, &["www-web-0", "www-web-1"], 5);
    assert_no_problems(cluster);
    finish(cluster, &ns);
}

fn restart_mid_scale_down(cluster: &mut Cluster) {
    let (service, mut set) = set_with_policy(B, "web", 3, "Retain", "Delete", &[]);
    // Condemned pods take a few seconds to go, so the restarted controller
    // finds the scale-down in progress.
    let spec = &mut set["spec"]["template"]["spec"];
    spec["terminationGracePeriodSeconds"] = json!(15);
    spec["containers"][0]["lifecycle"] = json!({"preStop": {"exec": {"command": ["sleep", "6"]}}});
    let ns = deploy(cluster, "restart", (service, set), 3);
    scale(cluster, &ns, 1);
    std::thread::sleep(Duration::from_millis(300));
    kill_retention(cluster);
    std::thread::sleep(Duration::from_millis(500));
    start_retention(cluster);
    wait_claims(cluster, &ns, &["www-web-0"], 120);
    wait_pods_ready(cluster, &ns, &ordinals("web", 1), 60);
    assert_no_problems(cluster);
    finish(cluster, &ns);
}

const RECREATE: (&str, &str) = ("kennel.csi.dev/on-node-loss", "recreate");

/// Issue: a Ready node that runs Kennel's driver is never lost, however
/// long a pod stays unschedulable on it.
fn cordoned_node_is_not_lost(cluster: &mut Cluster) {
    let set = set_with_policy(B, "web", 1, "Retain", "Retain", &[RECREATE]);
    let ns = deploy(cluster, "cordoned", set, 1);
    let pv = claim_pv(cluster, &ns, "www-web-0").expect("bound")["metadata"]["name"].clone();
    let node = cluster.node_name.clone();
    cluster.kubectl.run(&["cordon", &node]);
    cluster
        .kubectl
        .run(&["delete", "pod", "web-0", "-n", &ns, "--wait=true"]);
    // Pending and unschedulable for four grace periods: nothing is deleted.
    hold_claims(cluster, &ns, &["www-web-0"], 20);
    let still = claim_pv(cluster, &ns, "www-web-0").expect("claim kept and bound");
    assert_eq!(still["metadata"]["name"], pv);
    cluster.kubectl.run(&["uncordon", &node]);
    wait_pods_ready(cluster, &ns, &ordinals("web", 1), 120);
    assert!(
        events(cluster, &ns, "ClaimRecreatedAfterNodeLoss").is_empty(),
        "a claim was recreated on a Ready, cordoned node"
    );
    finish(cluster, &ns);
}

fn node_loss_node_deleted(cluster: &mut Cluster) {
    node_loss(cluster, "node-b", false);
}

fn node_loss_not_ready(cluster: &mut Cluster) {
    node_loss(cluster, "node-c", true);
}

/// The node of a pod dies; its Node object is deleted (or, with
/// `not_ready`, it stays NotReady with Kennel's driver gone from its
/// CSINode, which is no evidence: the claim is held for several grace
/// periods, until the administrator taints the node out of service). A
/// grace period after the evidence appears Kennel deletes the claim and the
/// waiting pod; the set recreates both on the new node, with a fresh volume.
fn node_loss(cluster: &mut Cluster, new_node: &str, not_ready: bool) {
    let set = set_with_policy(B, "web", 1, "Retain", "Retain", &[RECREATE]);
    let ns = deploy(
        cluster,
        if not_ready {
            "node-notready"
        } else {
            "node-deleted"
        },
        set,
        1,
    );
    let old_pv = claim_pv(cluster, &ns, "www-web-0").expect("bound");
    let old_pv_name = old_pv["metadata"]["name"].as_str().expect("pv").to_owned();
    let old_node = cluster.node_name.clone();
    exec_ok(
        cluster,
        &ns,
        "web-0",
        &["tee", &format!("{WWW}/data")],
        Some(b"old node\n"),
    );
    cluster.lose_node(not_ready);
    if not_ready {
        wait_for(
            &format!("node {old_node} NotReady"),
            90,
            || {
                let node = cluster.kubectl.get(&["node", &old_node])?;
                (cluster_support::kube::condition(&node, "Ready") != Some("True")).then_some(())
            },
            String::new,
        );
    } else {
        cluster
            .kubectl
            .run(&["delete", "node", &old_node, "--wait=true"]);
    }
    // What an administrator does for a pod on a dead node.
    cluster.kubectl.run(&[
        "delete",
        "pod",
        "web-0",
        "-n",
        &ns,
        "--force",
        "--grace-period=0",
    ]);
    cluster.add_node(new_node, B);
    if not_ready {
        // NotReady and deregistered for four grace periods: nothing is lost yet.
        hold_claims(cluster, &ns, &["www-web-0"], 20);
        let held = claim_pv(cluster, &ns, "www-web-0").expect("claim kept and bound");
        assert_eq!(held["metadata"]["name"], old_pv_name.as_str());
        // Kubernetes' own word that the node is down.
        cluster.kubectl.run(&[
            "taint",
            "node",
            &old_node,
            "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
        ]);
    }
    wait_for(
        &format!("web-0 Running on {new_node} with a new claim"),
        180,
        || {
            let pod = pod(cluster, &ns, "web-0")?;
            if !running_and_ready(&pod) || pod["spec"]["nodeName"] != new_node {
                return None;
            }
            let pv = claim_pv(cluster, &ns, "www-web-0")?;
            (pv["metadata"]["name"] != old_pv_name.as_str()).then_some(())
        },
        || describe(cluster, &ns) + &retention_tail(cluster),
    );
    let pv = claim_pv(cluster, &ns, "www-web-0").expect("bound");
    assert_eq!(pv_node(&pv).as_deref(), Some(new_node));
    let listing = exec_ok(cluster, &ns, "web-0", &["ls", "-A", WWW], None);
    assert!(
        !listing.contains("data"),
        "the new volume is not empty: {listing}"
    );
    if not_ready {
        // The node may come back with its disk: its own provisioner then
        // deletes the released volume. Kennel leaves the PV alone.
        hold_pv_released(cluster, &ns, &old_pv_name);
    } else {
        wait_for(
            &format!("the deleted node's released PV {old_pv_name} removed"),
            90,
            || {
                cluster
                    .kubectl
                    .get(&["pv", &old_pv_name])
                    .is_none()
                    .then_some(())
            },
            || describe(cluster, &ns) + &retention_tail(cluster),
        );
    }
    let recreated = events(cluster, &ns, "ClaimRecreatedAfterNodeLoss");
    assert!(
        recreated.iter().any(|m| m.contains("www-web-0")),
        "no ClaimRecreatedAfterNodeLoss event names www-web-0: {recreated:?}\n{}",
        describe(cluster, &ns)
    );
    // The warning is logged when the evidence appears, not on every pass.
    let log = retention_log(cluster);
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("ns={ns} ")) && l.contains("reason=\"NodeLost\""))
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "NodeLost logged {} times: {warned:#?}",
        warned.len()
    );
    finish(cluster, &ns);
}

#[track_caller]
fn hold_pv_released(cluster: &Cluster, ns: &str, pv: &str) {
    for _ in 0..10 {
        let found = cluster.kubectl.get(&["pv", pv]);
        let phase = found.as_ref().map(|p| p["status"]["phase"].clone());
        assert_eq!(
            phase,
            Some(json!("Released")),
            "the NotReady node's PV {pv} must stay, Released\n{}",
            describe(cluster, ns)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn assert_no_problems(cluster: &Cluster) {
    let problems = retention_problems(&retention_log(cluster));
    assert!(
        problems.is_empty(),
        "kennel retention logged problems:\n{}",
        problems.join("\n")
    );
}
