//! Kennel on two real nodes: node-a on the host, node-b in a network namespace of its own
//! (own address, containerd, kubelet, cgroup root and Kennel node plugin), one Kubernetes 1.36
//! control plane. What one node cannot show: volumes that stay on their node, capacity that
//! steers a claim to the node with room, and node loss judged on Kubernetes' word only — a
//! cordon, a NotReady node, a kubelet that comes back or a driver that re-registers never cost
//! a claim; a deleted Node object or the out-of-service taint does, after the grace period and
//! only where the StatefulSet opted in.

mod cluster_support;
#[path = "cluster_two_nodes/migrate_on_drain.rs"]
mod migrate_on_drain;
#[path = "cluster_two_nodes/restore_anywhere.rs"]
mod restore_anywhere;

use std::time::Duration;

use cluster_support::kube::{condition, name_of};
use cluster_support::procs::wait_for;
use cluster_support::retention::*;
use cluster_support::workload::*;
use cluster_support::{run_scenarios, Backend, Cluster, ClusterOpts, K8s};
use serde_json::{json, Value};

const B: Backend = Backend::Loop;
const NODE_A: &str = "node-a";
const RECREATE: (&str, &str) = ("kennel.csi.dev/on-node-loss", "recreate");

#[test]
fn two_nodes() {
    run_scenarios(
        ClusterOpts {
            k8s: K8s::V1_36,
            node_monitor_grace: Some(Duration::from_secs(15)),
            peers: vec!["node-b"],
            ..ClusterOpts::default()
        },
        B,
        &[
            ("volumes-stay-on-their-node", volumes_stay_on_their_node),
            ("capacity-steers-claims", capacity_steers_claims),
            (
                "expansion-by-the-holding-node",
                expansion_by_the_holding_node,
            ),
            ("restore-anywhere", restore_anywhere::restore_anywhere),
            (
                "restore-survives-a-cut-link",
                restore_anywhere::restore_survives_a_cut_link,
            ),
            ("migrate-on-drain", migrate_on_drain::migrate_on_drain),
            (
                "migrate-survives-controller-kills",
                migrate_on_drain::migrate_survives_controller_kills,
            ),
            (
                "migrate-survives-source-driver-kills",
                migrate_on_drain::migrate_survives_source_driver_kills,
            ),
            (
                "migrate-survives-target-driver-kills",
                migrate_on_drain::migrate_survives_target_driver_kills,
            ),
            (
                "migrate-undone-on-uncordon",
                migrate_on_drain::migrate_undone_on_uncordon,
            ),
            ("no-evidence-no-loss", no_evidence_no_loss),
            ("node-deleted", node_deleted),
            ("out-of-service", out_of_service),
        ],
    );
}

/// The name the namespace'd peer node has now (a lost node is replaced under a new name).
fn peer_name(cluster: &Cluster) -> String {
    cluster.peers[0].name.clone()
}

/// A one-replica webserver set `name` (Retain policies, `annotations`) whose pod prefers
/// `node`; a recreated pod may go anywhere.
fn set_preferring(name: &str, node: &str, annotations: &[(&str, &str)]) -> (Value, Value) {
    let (service, mut set) = set_with_policy(B, name, 1, "Retain", "Retain", annotations);
    set["spec"]["template"]["spec"]["affinity"] = json!({
        "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "preference": {"matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": [node],
            }]},
        }]},
    });
    (service, set)
}

/// One-replica sets on the peer node, each `(name, annotations)`: applied, Ready, checked to
/// run on the peer. Returns each set's PV (of claim `www-<name>-0`), in order.
fn sets_on_peer(cluster: &Cluster, ns: &str, sets: &[(&str, &[(&str, &str)])]) -> Vec<String> {
    let peer = peer_name(cluster);
    for (name, annotations) in sets {
        apply_set(cluster, ns, &set_preferring(name, &peer, annotations));
    }
    let pods: Vec<String> = sets.iter().map(|(name, _)| format!("{name}-0")).collect();
    wait_pods_ready(cluster, ns, &pods, 120);
    pods.iter()
        .map(|p| {
            assert_eq!(
                pod_node(cluster, ns, p).as_deref(),
                Some(peer.as_str()),
                "{p}"
            );
            name_of(&claim_pv(cluster, ns, &format!("www-{p}")).expect("bound")).to_owned()
        })
        .collect()
}

fn namespace(cluster: &mut Cluster, scenario: &str) -> String {
    if !cluster.extra.iter().any(|d| d.name == "kennel-retention") {
        start_retention(cluster);
    }
    cluster.namespace(scenario)
}

fn apply_set(cluster: &Cluster, ns: &str, set: &(Value, Value)) {
    cluster.kubectl.apply(Some(ns), &set.0);
    cluster.kubectl.apply(Some(ns), &set.1);
}

fn pod_node(cluster: &Cluster, ns: &str, pod_name: &str) -> Option<String> {
    pod(cluster, ns, pod_name)?["spec"]["nodeName"]
        .as_str()
        .map(str::to_owned)
}

fn finish(cluster: &Cluster, ns: &str) {
    for kind in ["statefulset", "pod", "pvc"] {
        cluster
            .kubectl
            .run(&["delete", kind, "--all", "-n", ns, "--wait=false"]);
    }
    cluster
        .kubectl
        .run(&["delete", "namespace", ns, "--wait=false"]);
}

fn write_file(cluster: &Cluster, ns: &str, pod_name: &str, text: &str) {
    exec_ok(
        cluster,
        ns,
        pod_name,
        &["sh", "-c", &format!("echo {text} > {WWW}/data && sync")],
        None,
    );
}

fn read_file(cluster: &Cluster, ns: &str, pod_name: &str) -> String {
    exec_ok(
        cluster,
        ns,
        pod_name,
        &["cat", &format!("{WWW}/data")],
        None,
    )
}

/// Wait until node `name`'s Ready condition is `ready`.
fn wait_node_ready_is(cluster: &Cluster, name: &str, ready: bool, secs: u64) {
    wait_for(
        &format!("node {name} Ready={ready}"),
        secs,
        || {
            let node = cluster.kubectl.get(&["node", name])?;
            ((condition(&node, "Ready") == Some("True")) == ready).then_some(())
        },
        String::new,
    );
}

/// A StatefulSet spread over both nodes keeps each volume on its pod's node: the PV is pinned
/// there and only that node's storage holds it.
fn volumes_stay_on_their_node(cluster: &mut Cluster) {
    let ns = namespace(cluster, "spread");
    let (service, mut set) = webserver(B, "web", 2);
    set["spec"]["template"]["spec"]["affinity"] = json!({
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"app": "web"}},
            "topologyKey": "kubernetes.io/hostname",
        }]},
    });
    apply_set(cluster, &ns, &(service, set));
    wait_pods_ready(cluster, &ns, &ordinals("web", 2), 240);
    let peer = peer_name(cluster);
    let mut seen = Vec::new();
    for ordinal in ordinals("web", 2) {
        let node = pod_node(cluster, &ns, &ordinal).expect("scheduled");
        let pv = claim_pv(cluster, &ns, &format!("www-{ordinal}")).expect("bound");
        assert_eq!(
            pv_node(&pv).as_deref(),
            Some(node.as_str()),
            "{ordinal}'s PV"
        );
        let id = volume_id(&pv);
        let (here, there) = if node == NODE_A {
            (cluster.plugin(), cluster.peer(&peer).plugin())
        } else {
            (cluster.peer(&peer).plugin(), cluster.plugin())
        };
        assert!(here.storage.stored(&id), "{id} missing on {node}");
        assert!(!there.storage.stored(&id), "{id} also stored off {node}");
        write_file(cluster, &ns, &ordinal, &format!("from-{node}"));
        assert_eq!(
            read_file(cluster, &ns, &ordinal).trim(),
            format!("from-{node}")
        );
        seen.push(node);
    }
    seen.sort();
    assert_eq!(seen, vec![NODE_A.to_owned(), peer], "one pod per node");
    finish(cluster, &ns);
}

/// A claim and a pod using it, optionally pinned to `node`.
fn claim_and_pod(cluster: &Cluster, ns: &str, name: &str, size: &str, node: Option<&str>) {
    claim_and_pod_of(cluster, ns, name, B.storage_class(), size, node);
}

/// The same, of StorageClass `class`.
fn claim_and_pod_of(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    class: &str,
    size: &str,
    node: Option<&str>,
) {
    cluster.kubectl.apply(
        Some(ns),
        &json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "resources": {"requests": {"storage": size}},
            },
        }),
    );
    pod_using(cluster, ns, name, node);
}

/// A pod `name` mounting claim `name` at /v, optionally pinned to `node`.
fn pod_using(cluster: &Cluster, ns: &str, name: &str, node: Option<&str>) {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": false,
        "containers": [{
            "name": "c", "image": cluster_support::images::BUSYBOX_IMAGE,
            "imagePullPolicy": "Never", "command": ["sleep", "3600"],
            "volumeMounts": [{"name": "v", "mountPath": "/v"}],
        }],
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": name}}],
    });
    if let Some(node) = node {
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    }
    cluster.kubectl.apply(
        Some(ns),
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}),
    );
}

/// The capacity csi-provisioner publishes for `node` and Kennel's class, in bytes.
fn published_capacity(cluster: &Cluster, node: &str) -> Option<u64> {
    cluster
        .kubectl
        .list(&["csistoragecapacity", "-n", "kennel-system"])
        .iter()
        .find(|c| {
            c["storageClassName"] == B.storage_class()
                && c["nodeTopology"]["matchLabels"][cluster_support::TOPOLOGY_KEY] == node
        })
        .and_then(|c| parse_quantity(c["capacity"].as_str()?))
}

/// Bytes in a Kubernetes quantity of the forms csi-provisioner writes (`123`, `12Ki`, `5Mi`,
/// `2Gi`).
fn parse_quantity(q: &str) -> Option<u64> {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    Some(n * scale)
}

/// With most of node-a's pool taken, a claim that does not fit there goes to node-b; one
/// that fits nowhere stays Pending for want of storage.
fn capacity_steers_claims(cluster: &mut Cluster) {
    let ns = namespace(cluster, "capacity");
    let peer = peer_name(cluster);
    claim_and_pod(cluster, &ns, "big", "1536Mi", Some(NODE_A));
    wait_pods_ready(cluster, &ns, &["big".to_owned()], 120);
    // csi-provisioner refreshes node-a's CSIStorageCapacity from GetCapacity.
    wait_for(
        "node-a's published capacity to drop below 1 GiB",
        120,
        || (published_capacity(cluster, NODE_A)? < 1 << 30).then_some(()),
        || describe(cluster, &ns),
    );
    assert!(
        published_capacity(cluster, &peer).is_some_and(|c| c >= 1 << 30),
        "{peer} has room\n{}",
        describe(cluster, &ns)
    );
    claim_and_pod(cluster, &ns, "next", "1Gi", None);
    wait_pods_ready(cluster, &ns, &["next".to_owned()], 120);
    assert_eq!(
        pod_node(cluster, &ns, "next").as_deref(),
        Some(peer.as_str())
    );
    let pv = claim_pv(cluster, &ns, "next").expect("bound");
    assert_eq!(pv_node(&pv).as_deref(), Some(peer.as_str()));
    claim_and_pod(cluster, &ns, "huge", "3Gi", None);
    wait_for(
        "the scheduler to say no node has storage for huge",
        60,
        || {
            cluster
                .kubectl
                .list(&["events", "-n", &ns])
                .iter()
                .any(|e| {
                    e["reason"] == "FailedScheduling"
                        && e["involvedObject"]["name"] == "huge"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("did not have enough free storage"))
                })
                .then_some(())
        },
        || describe(cluster, &ns),
    );
    let huge = cluster
        .kubectl
        .get(&["pvc", "huge", "-n", &ns])
        .expect("claim");
    assert_eq!(
        huge["status"]["phase"], "Pending",
        "no volume for a claim that fits nowhere"
    );
    finish(cluster, &ns);
    wait_for(
        "the scenario's volumes deleted",
        120,
        || {
            (published_capacity(cluster, NODE_A)? >= 1536 << 20
                && published_capacity(cluster, &peer)? >= 2 << 30)
                .then_some(())
        },
        || describe(cluster, &ns),
    );
}

/// The node whose csi-resizer leads (holds the lease), and the other one.
fn resizer_leader(cluster: &Cluster) -> (String, String) {
    let peer = peer_name(cluster);
    let logs = [
        (NODE_A.to_owned(), "csi-resizer.log".to_owned()),
        (peer.clone(), format!("csi-resizer-{peer}.log")),
    ];
    let leader = wait_for(
        "one node's csi-resizer to lead",
        60,
        || {
            logs.iter()
                .find(|(_, log)| {
                    std::fs::read_to_string(cluster.logs.join(log))
                        .unwrap_or_default()
                        .contains("Successfully acquired lease")
                })
                .map(|(node, _)| node.clone())
        },
        String::new,
    );
    let other = if leader == NODE_A {
        peer
    } else {
        NODE_A.to_owned()
    };
    (leader, other)
}

fn driver_log_of(cluster: &Cluster, node: &str) -> String {
    if node == NODE_A {
        cluster.plugin().driver_log()
    } else {
        cluster.peer(node).plugin().driver_log()
    }
}

/// A claim grows while its pod runs on the node whose csi-resizer does not lead (csi-resizer
/// has no node-deployment mode: the nodes' resizers elect one). The leader's driver asks the
/// volume's node through the PV; that node grows it and says so; the leader's resizer finishes
/// the expansion and the kubelet grows the filesystem. No resizer reports a failure, the
/// expansion is never marked infeasible, and the pod sees the new size. Then a size beyond the
/// holder's pool: the holder's refusal reaches the resizer, and still nothing is infeasible.
fn expansion_by_the_holding_node(cluster: &mut Cluster) {
    let ns = namespace(cluster, "expansion");
    let (leader, holder) = resizer_leader(cluster);
    let class = format!("{ns}-xfs");
    cluster.kubectl.apply(
        None,
        &json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": class},
            "provisioner": cluster_support::DRIVER_NAME,
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": true,
            "reclaimPolicy": "Delete",
            "parameters": {"csi.storage.k8s.io/fstype": "xfs"},
        }),
    );
    // xfs needs 300 MiB.
    claim_and_pod_of(cluster, &ns, "grow", &class, "300Mi", Some(&holder));
    wait_pods_ready(cluster, &ns, &["grow".to_owned()], 180);
    let pv = claim_pv(cluster, &ns, "grow").expect("bound");
    let id = volume_id(&pv);
    let before = df_kib(cluster, &ns, "grow", "/v");
    resize_claim(cluster, &ns, "grow", "400Mi");
    let mut infeasible = Vec::new();
    wait_for(
        "claim grow's status.capacity at 400Mi",
        120,
        || {
            let pvc = cluster.kubectl.get(&["pvc", "grow", "-n", &ns])?;
            let state = &pvc["status"]["allocatedResourceStatuses"]["storage"];
            if state.as_str().is_some_and(|s| s.contains("Infeasible")) {
                infeasible.push(state.to_string());
            }
            (pvc["status"]["capacity"]["storage"] == "400Mi").then_some(())
        },
        || describe(cluster, &ns),
    );
    assert!(infeasible.is_empty(), "marked infeasible: {infeasible:?}");
    let pvc = cluster
        .kubectl
        .get(&["pvc", "grow", "-n", &ns])
        .expect("claim");
    assert!(
        pvc["status"]["allocatedResourceStatuses"]["storage"].is_null(),
        "expansion left a state behind: {}",
        pvc["status"]
    );
    let failures: Vec<String> = ["VolumeResizeFailed", "ControllerResizeInfeasible"]
        .iter()
        .flat_map(|reason| events(cluster, &ns, reason))
        .collect();
    assert!(failures.is_empty(), "a resizer failed: {failures:?}");
    let asked = driver_log_of(cluster, &leader);
    assert!(
        asked
            .lines()
            .any(|l| l.contains("asked the volume's node to grow it") && l.contains(&id)),
        "{leader}'s driver did not hand {id} to {holder}"
    );
    let grown = driver_log_of(cluster, &holder);
    assert!(
        grown
            .lines()
            .any(|l| l.contains("expanded for another node's resizer") && l.contains(&id)),
        "{holder}'s driver did not grow {id}"
    );
    let after = df_kib(cluster, &ns, "grow", "/v");
    assert!(
        after >= before + 90 * 1024,
        "the pod sees {after} KiB after growing 300Mi to 400Mi (was {before} KiB)"
    );
    // More than the holder's pool: the holder refuses, the leader's resizer is told why at
    // once, and the claim is still not marked infeasible (a retry is a new request).
    resize_claim(cluster, &ns, "grow", "3Gi");
    let refused = wait_for(
        "the holder's refusal reported by the resizer",
        60,
        || {
            events(cluster, &ns, "VolumeResizeFailed")
                .into_iter()
                .find(|m| m.contains(&format!("node {holder} could not grow volume {id}")))
        },
        || describe(cluster, &ns),
    );
    assert!(refused.contains("available"), "{refused}");
    let pvc = cluster
        .kubectl
        .get(&["pvc", "grow", "-n", &ns])
        .expect("claim");
    let state = pvc["status"]["allocatedResourceStatuses"]["storage"].to_string();
    assert!(!state.contains("Infeasible"), "marked infeasible: {state}");
    finish(cluster, &ns);
    cluster.kubectl.run(&["delete", "storageclass", &class]);
}

/// None of these is evidence that node-b is gone, however long it lasts: a cordon with the
/// pod Pending, a NotReady node whose kubelet comes back, a driver that deregisters and
/// registers again. The claim, its volume and its data stay.
fn no_evidence_no_loss(cluster: &mut Cluster) {
    let ns = namespace(cluster, "no-evidence");
    let peer = peer_name(cluster);
    let pv = sets_on_peer(cluster, &ns, &[("web", &[RECREATE])]).remove(0);
    write_file(cluster, &ns, "web-0", "kept");
    let same_claim = |cluster: &Cluster| {
        let now = claim_pv(cluster, &ns, "www-web-0").expect("claim kept and bound");
        assert_eq!(name_of(&now), pv, "www-web-0 changed volume");
        let pvc = cluster
            .kubectl
            .get(&["pvc", "www-web-0", "-n", &ns])
            .expect("claim");
        assert!(
            pvc["metadata"]["annotations"]["kennel.csi.dev/node-lost"].is_null(),
            "a loss was recorded: {}",
            pvc["metadata"]["annotations"]
        );
    };

    // A cordon with the pod Pending on it for four grace periods.
    cluster.kubectl.run(&["cordon", &peer]);
    cluster
        .kubectl
        .run(&["delete", "pod", "web-0", "-n", &ns, "--wait=true"]);
    hold_claims(cluster, &ns, &["www-web-0"], 20);
    same_claim(cluster);
    cluster.kubectl.run(&["uncordon", &peer]);
    wait_pods_ready(cluster, &ns, &ordinals("web", 1), 120);

    // The kubelet dies; the node goes NotReady; the kubelet comes back.
    cluster.kill_peer_kubelet(&peer);
    wait_node_ready_is(cluster, &peer, false, 90);
    hold_claims(cluster, &ns, &["www-web-0"], 10);
    cluster.restart_peer_kubelet(&peer);
    same_claim(cluster);

    // The driver deregisters and registers again; the pod is recreated on the node.
    cluster.restart_peer_plugin(&peer);
    cluster
        .kubectl
        .run(&["delete", "pod", "web-0", "-n", &ns, "--wait=true"]);
    wait_pods_ready(cluster, &ns, &ordinals("web", 1), 120);
    assert_eq!(
        pod_node(cluster, &ns, "web-0").as_deref(),
        Some(peer.as_str())
    );
    same_claim(cluster);
    assert_eq!(read_file(cluster, &ns, "web-0").trim(), "kept");
    for reason in ["NodeLost", "ClaimRecreatedAfterNodeLoss"] {
        let seen = events(cluster, &ns, reason);
        assert!(seen.is_empty(), "{reason} without evidence: {seen:?}");
    }
    finish(cluster, &ns);
}

/// Wait until the set's pod `pod_name` runs on node-a with a claim (`www-<pod>`) bound to a
/// volume other than `old_pv`.
fn wait_recreated_on_node_a(cluster: &Cluster, ns: &str, pod_name: &str, old_pv: &str) {
    wait_for(
        &format!("{pod_name} Running on node-a with a new claim"),
        240,
        || {
            let p = pod(cluster, ns, pod_name)?;
            if !running_and_ready(&p) || p["spec"]["nodeName"] != NODE_A {
                return None;
            }
            let pv = claim_pv(cluster, ns, &format!("www-{pod_name}"))?;
            (name_of(&pv) != old_pv).then_some(())
        },
        || describe(cluster, ns) + &retention_tail(cluster),
    );
}

/// Lines of the retention log that warn NodeLost for `set` in `ns`.
fn node_lost_warnings(cluster: &Cluster, ns: &str, set: &str) -> usize {
    retention_log(cluster)
        .lines()
        .filter(|l| {
            l.contains(&format!("ns={ns} "))
                && l.contains(&format!("set={set} "))
                && l.contains("reason=\"NodeLost\"")
        })
        .count()
}

/// Node-b dies for real and its Node object is deleted: the pod garbage collector removes its
/// pods and the StatefulSets recreate them, Pending on a volume pinned to a node that is gone.
/// The set that opted in gets a new claim on node-a after the grace period; the other keeps
/// its claim, and an Event tells the administrator what they can do. Each NodeLost warning is
/// logged once.
fn node_deleted(cluster: &mut Cluster) {
    let ns = namespace(cluster, "node-deleted");
    let peer = peer_name(cluster);
    let pvs = sets_on_peer(cluster, &ns, &[("move", &[RECREATE]), ("keep", &[])]);
    let (moved_pv, kept_pv) = (pvs[0].clone(), pvs[1].clone());
    for p in ["move-0", "keep-0"] {
        write_file(cluster, &ns, p, "on-the-lost-node");
    }

    cluster.lose_peer(&peer);
    wait_node_ready_is(cluster, &peer, false, 90);
    cluster
        .kubectl
        .run(&["delete", "node", &peer, "--wait=true"]);
    wait_recreated_on_node_a(cluster, &ns, "move-0", &moved_pv);
    let listing = exec_ok(cluster, &ns, "move-0", &["ls", "-A", WWW], None);
    assert!(
        !listing.contains("data"),
        "the new volume is not empty: {listing}"
    );
    let recreated = events(cluster, &ns, "ClaimRecreatedAfterNodeLoss");
    assert!(
        recreated.iter().any(|m| m.contains("www-move-0")),
        "no ClaimRecreatedAfterNodeLoss for www-move-0: {recreated:?}"
    );
    // The set that did not opt in: still waiting on its old claim, told what to do.
    let kept = claim_pv(cluster, &ns, "www-keep-0").expect("claim kept and bound");
    assert_eq!(name_of(&kept), kept_pv);
    let keep_pod = pod(cluster, &ns, "keep-0").expect("keep-0 recreated");
    assert!(
        !running_and_ready(&keep_pod),
        "keep-0 cannot run without its node"
    );
    let waiting = events(cluster, &ns, "NodeLost");
    assert!(
        waiting
            .iter()
            .any(|m| m.contains("keep-0") && m.contains("kennel.csi.dev/on-node-loss=recreate")),
        "no NodeLost event tells the administrator how to move keep-0: {waiting:?}"
    );
    assert!(
        !recreated.iter().any(|m| m.contains("www-keep-0")),
        "a claim of a set that did not opt in was recreated"
    );
    hold_claims(cluster, &ns, &["www-keep-0", "www-move-0"], 10);
    for set in ["move", "keep"] {
        assert_eq!(
            node_lost_warnings(cluster, &ns, set),
            1,
            "NodeLost warnings for {set}"
        );
    }
    finish(cluster, &ns);
    cluster.replace_peer(&peer, "node-c", B);
}

/// Node-c dies and stays NotReady (no evidence), then the administrator taints it
/// out-of-service: Kubernetes removes its pods, and the opted-in set's claim is recreated on
/// node-a after the grace period.
fn out_of_service(cluster: &mut Cluster) {
    let ns = namespace(cluster, "out-of-service");
    let peer = peer_name(cluster);
    let old_pv = sets_on_peer(cluster, &ns, &[("web", &[RECREATE])]).remove(0);
    cluster.lose_peer(&peer);
    wait_node_ready_is(cluster, &peer, false, 90);
    hold_claims(cluster, &ns, &["www-web-0"], 10);
    cluster.kubectl.run(&[
        "taint",
        "node",
        &peer,
        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
    ]);
    wait_recreated_on_node_a(cluster, &ns, "web-0", &old_pv);
    let recreated = events(cluster, &ns, "ClaimRecreatedAfterNodeLoss");
    assert!(
        recreated
            .iter()
            .any(|m| m.contains("www-web-0") && m.contains("out-of-service")),
        "no ClaimRecreatedAfterNodeLoss naming the taint: {recreated:?}"
    );
    assert_eq!(node_lost_warnings(cluster, &ns, "web"), 1);
    finish(cluster, &ns);
}

/// `kennel ctl where -n <ns> -o json` with the cluster's admin kubeconfig: each claim's row.
fn ctl_where(cluster: &Cluster, ns: &str) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kennel"))
        .args(["ctl", "where", "-n", ns, "-o", "json"])
        .env("KUBECONFIG", &cluster.admin_kubeconfig)
        .output()
        .expect("run kennel ctl where");
    assert!(
        out.status.success(),
        "kennel ctl where: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON rows")
}

/// The row of `claim` in `kennel ctl where`.
fn placement_of(cluster: &Cluster, ns: &str, claim: &str) -> Option<Value> {
    ctl_where(cluster, ns)
        .into_iter()
        .find(|row| row["claim"] == claim)
}

/// The MD5 of `path` in `pod`'s container.
fn md5_in(cluster: &Cluster, ns: &str, pod: &str, path: &str) -> String {
    let out = exec_ok(cluster, ns, pod, &["md5sum", path], None);
    out.split_whitespace().next().expect("md5sum").to_owned()
}
