//! Restore anywhere: a VolumeSnapshot taken on node-a restores into a claim the scheduler puts
//! on node-b. Node-b's driver pulls the bytes from node-a's over the peer channel (mutual TLS,
//! checked end to end) and only then answers CreateVolume.

use std::time::Instant;

use serde_json::{json, Value};

use super::cluster_support::node_plugin::{http_get_at, NodePlugin};
use super::cluster_support::procs::wait_for;
use super::cluster_support::workload::*;
use super::cluster_support::Cluster;
use super::{claim_and_pod, driver_log_of, peer_name, pod_node, pod_using, B, NODE_A};

/// Random bytes the pods write and read back.
const BLOB_MIB: u32 = 48;
/// For the cut: enough that the pull is well past its first sync (every 64 MiB) when held.
const BIG_BLOB_MIB: u32 = 200;
/// Chunks (1 MiB each) node-a sends before the test holds the transfer and cuts the link.
const CHUNKS_BEFORE_CUT: u32 = 100;

/// The sum of every sample of `name` (a counter, with or without labels) that matches
/// `labels` in the plugin's /metrics.
fn metric(plugin: &NodePlugin, name: &str, labels: &str) -> u64 {
    let body = http_get_at(&plugin.metrics_host, plugin.metrics_port, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn checksum(cluster: &Cluster, ns: &str, pod: &str) -> String {
    super::md5_in(cluster, ns, pod, "/v/blob")
}

/// A VolumeSnapshot of `claim` named `name`, ready; returns its content's snapshot handle.
fn snapshot_of(cluster: &Cluster, ns: &str, name: &str, claim: &str) -> String {
    cluster.kubectl.apply(
        Some(ns),
        &json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name},
            "spec": {
                "volumeSnapshotClassName": "kennel",
                "source": {"persistentVolumeClaimName": claim},
            },
        }),
    );
    let content = wait_for(
        &format!("VolumeSnapshot {name} ready to use"),
        120,
        || {
            let snap = cluster.kubectl.get(&["volumesnapshot", name, "-n", ns])?;
            (snap["status"]["readyToUse"] == true).then(|| {
                snap["status"]["boundVolumeSnapshotContentName"]
                    .as_str()
                    .map(str::to_owned)
            })?
        },
        || describe(cluster, ns),
    );
    let content: Value = cluster
        .kubectl
        .get(&["volumesnapshotcontent", &content])
        .expect("the snapshot's content");
    content["status"]["snapshotHandle"]
        .as_str()
        .expect("a snapshot handle")
        .to_owned()
}

/// A claim `name` restored from VolumeSnapshot `snapshot`, and a pod using it on `node`.
fn restored_claim_and_pod(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    snapshot: &str,
    node: &str,
    size: &str,
) {
    cluster.kubectl.apply(
        Some(ns),
        &json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": B.storage_class(),
                "resources": {"requests": {"storage": size}},
                "dataSource": {
                    "apiGroup": "snapshot.storage.k8s.io",
                    "kind": "VolumeSnapshot",
                    "name": snapshot,
                },
            },
        }),
    );
    pod_using(cluster, ns, name, Some(node));
}

/// A claim on node-a holding `mib` MiB of random bytes (and hello.txt): its checksum.
fn source_with_data(cluster: &Cluster, ns: &str, size: &str, mib: u32) -> String {
    claim_and_pod(cluster, ns, "source", size, Some(NODE_A));
    wait_pods_ready(cluster, ns, &["source".to_owned()], 120);
    exec_ok(
        cluster,
        ns,
        "source",
        &[
            "sh",
            "-c",
            &format!(
                "head -c {} /dev/urandom > /v/blob && echo hello > /v/hello.txt && sync",
                mib << 20
            ),
        ],
        None,
    );
    checksum(cluster, ns, "source")
}

pub fn restore_anywhere(cluster: &mut Cluster) {
    let ns = cluster.namespace("restore-anywhere");
    let peer = peer_name(cluster);
    let written = source_with_data(cluster, &ns, "128Mi", BLOB_MIB);

    let handle = snapshot_of(cluster, &ns, "snap", "source");
    assert!(
        handle.ends_with(&format!("@{NODE_A}")),
        "the snapshot handle {handle} names the node holding it"
    );

    let started = Instant::now();
    restored_claim_and_pod(cluster, &ns, "copy", "snap", &peer, "128Mi");
    wait_pods_ready(cluster, &ns, &["copy".to_owned()], 180);
    let restored = started.elapsed();
    assert_eq!(
        pod_node(cluster, &ns, "copy").as_deref(),
        Some(peer.as_str())
    );
    let pv = claim_pv(cluster, &ns, "copy").expect("the restored claim is bound");
    assert_eq!(
        pv_node(&pv).as_deref(),
        Some(peer.as_str()),
        "the copy's PV"
    );
    let id = volume_id(&pv);
    assert!(
        cluster.peer(&peer).plugin().storage.stored(&id),
        "{id} on {peer}"
    );
    assert!(
        !cluster.plugin().storage.stored(&id),
        "{id} also on {NODE_A}"
    );
    assert_eq!(checksum(cluster, &ns, "copy"), written, "the copy's bytes");
    assert_eq!(
        exec_ok(cluster, &ns, "copy", &["cat", "/v/hello.txt"], None).trim(),
        "hello"
    );

    // Both ends counted one successful transfer of the whole snapshot.
    let (holder, puller) = (cluster.plugin(), cluster.peer(&peer).plugin());
    assert_eq!(metric(holder, "kennel_peer_reads", "outcome=\"OK\""), 1);
    assert_eq!(metric(puller, "kennel_peer_pulls", "outcome=\"OK\""), 1);
    let served = metric(holder, "kennel_peer_served_bytes", "");
    assert!(served >= 128 << 20, "served {served} bytes");
    super::cluster_support::report(&format!(
        "restore anywhere: snapshot of a 128 MiB claim on {NODE_A} restored on {peer}, pod Ready {:.1}s after the claim ({served} bytes served)",
        restored.as_secs_f64()
    ));
    super::finish(cluster, &ns);
}

/// The link to node-b is cut while node-a sends it a snapshot: node-b's pull notices the
/// stall, retries while the link is down, and once it is back resumes from the bytes already
/// synced to disk (not from zero); the restored claim holds exactly the snapshot's bytes.
pub fn restore_survives_a_cut_link(cluster: &mut Cluster) {
    let ns = cluster.namespace("restore-cut");
    let peer = peer_name(cluster);
    let written = source_with_data(cluster, &ns, "256Mi", BIG_BLOB_MIB);
    let handle = snapshot_of(cluster, &ns, "snap", "source");
    let (pulled_before, reads_before) = (
        metric(cluster.peer(&peer).plugin(), "kennel_peer_pulled_bytes", ""),
        metric(cluster.plugin(), "kennel_peer_reads", ""),
    );

    // Node-a holds its transfer after CHUNKS_BEFORE_CUT chunks (src/faults.rs).
    let pause_dir = cluster.plugin().pause_dir.clone();
    let paused = pause_dir.join(kennel::faults::PAUSED_FILE);
    std::fs::write(
        pause_dir.join(kennel::faults::ARM_FILE),
        CHUNKS_BEFORE_CUT.to_string(),
    )
    .expect("arm the pause");
    let started = Instant::now();
    restored_claim_and_pod(cluster, &ns, "copy", "snap", &peer, "256Mi");
    wait_for(
        "node-a's transfer held mid-way",
        120,
        || paused.exists().then_some(()),
        || describe(cluster, &ns) + &driver_log_of(cluster, NODE_A),
    );
    // `kennel ctl where` shows the pull under way, from node-a, part done.
    let shown = wait_for(
        "kennel ctl where to show the pull of copy",
        30,
        || {
            let row = super::placement_of(cluster, &ns, "copy")?;
            let t = &row["transfer"];
            (t["from"] == NODE_A && t["done"].as_u64()? > 0).then(|| row.clone())
        },
        || describe(cluster, &ns),
    );
    assert!(
        shown["transfer"]["done"].as_u64() < shown["transfer"]["total"].as_u64(),
        "{shown}"
    );
    assert_eq!(shown["transfer"]["snapshot"], handle.as_str(), "{shown}");
    let link = cluster.peer(&peer).netns.clone();
    link.set_link(false);
    std::fs::remove_file(&paused).expect("release the transfer");
    // Longer than the pull's stall timeout (5 s): it gives up on the stream and retries while
    // the link is down.
    std::thread::sleep(std::time::Duration::from_secs(9));
    link.set_link(true);
    wait_pods_ready(cluster, &ns, &["copy".to_owned()], 240);
    let restored = started.elapsed();
    assert_eq!(checksum(cluster, &ns, "copy"), written, "the copy's bytes");

    let log = driver_log_of(cluster, &peer);
    let resumes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot pull interrupted, resuming"))
        .collect();
    assert!(!resumes.is_empty(), "no resume in {peer}'s log:\n{log}");
    let durable = resumes
        .iter()
        .filter_map(|l| {
            l.split("durable=")
                .nth(1)?
                .split([' ', ','])
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        durable >= 64 << 20,
        "resumed from {durable}, not from what was synced"
    );
    assert!(
        log.contains("pulled and verified a snapshot"),
        "no verified pull in {peer}'s log"
    );
    let pulled =
        metric(cluster.peer(&peer).plugin(), "kennel_peer_pulled_bytes", "") - pulled_before;
    let size = 256u64 << 20;
    assert!(pulled >= size, "pulled {pulled} bytes");
    assert!(
        pulled < size + (CHUNKS_BEFORE_CUT as u64) * (1 << 20),
        "pulled {pulled} bytes: the resume fetched again more than the unsynced part"
    );
    let reads = metric(cluster.plugin(), "kennel_peer_reads", "") - reads_before;
    assert!(reads >= 2, "node-a served {reads} reads for one restore");
    super::cluster_support::report(&format!(
        "restore across a cut link: {handle} ({size} bytes) restored on {peer} {:.1}s after the claim, the link down 9 s, resumed from {durable} bytes, {pulled} bytes pulled in all",
        restored.as_secs_f64()
    ));
    super::finish(cluster, &ns);
}
