//! Migrate on drain: a StatefulSet annotated `kennel.csi.dev/on-drain: migrate` survives
//! `kubectl drain` of its node with its data. The retention controller keeps the old volume,
//! snapshots it, restores the snapshot on the other node (whose driver pulls the bytes over the
//! peer channel), gives the claim's name that copy, and deletes the old volume only once the
//! pod is Ready on the new node. Killing the controller or either node's driver after any step
//! changes nothing of the outcome.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kennel::retention::migration_record::{step, STEPS};
use serde_json::Value;

use super::cluster_support::kube::{name_of, Kubectl};
use super::cluster_support::procs::wait_for;
use super::cluster_support::retention::*;
use super::cluster_support::workload::*;
use super::cluster_support::{report, Cluster};
use super::{apply_set, finish, namespace, peer_name, pod_node, set_preferring, NODE_A};

const MIGRATE: (&str, &str) = ("kennel.csi.dev/on-drain", "migrate");
/// What is killed after each step.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Controller,
    Driver(&'static str),
}

/// The claim size and MiB of random data of a migration: 64Mi with 16 MiB, or a claim of
/// `KENNEL_MIGRATE_SIZE_MIB` MiB (1024 for the 1 GiB figure) seven-eighths full (the rest is
/// the filesystem's own).
fn sizes() -> (String, u64) {
    match std::env::var("KENNEL_MIGRATE_SIZE_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(mib) => (format!("{mib}Mi"), mib - mib / 8),
        None => ("64Mi".to_owned(), 16),
    }
}

/// The set `name` on node-a with hello.txt and `mib` MiB of random bytes; returns the old PV
/// and the blob's checksum.
fn set_with_data(cluster: &Cluster, ns: &str, name: &str, size: &str, mib: u64) -> (Value, String) {
    let (service, mut set) = set_preferring(name, NODE_A, &[MIGRATE]);
    set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
        serde_json::json!(size);
    apply_set(cluster, ns, &(service, set));
    let pod = format!("{name}-0");
    wait_pods_ready(cluster, ns, std::slice::from_ref(&pod), 180);
    assert_eq!(pod_node(cluster, ns, &pod).as_deref(), Some(NODE_A));
    exec_ok(
        cluster,
        ns,
        &pod,
        &[
            "sh",
            "-c",
            &format!(
                "echo hello > {WWW}/hello.txt && head -c {} /dev/urandom > {WWW}/blob && sync",
                mib << 20
            ),
        ],
        None,
    );
    let pv = claim_pv(cluster, ns, &format!("www-{pod}")).expect("bound");
    (pv, checksum(cluster, ns, &pod))
}

fn checksum(cluster: &Cluster, ns: &str, pod: &str) -> String {
    super::md5_in(cluster, ns, pod, &format!("{WWW}/blob"))
}

/// Node-a uncordoned and the controller's stops disarmed when a scenario ends, also by a
/// failure: the next scenarios need both.
struct Restore {
    kubectl: Kubectl,
    pause_dir: Option<PathBuf>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(dir) = &self.pause_dir {
            let _ = std::fs::remove_file(dir.join(kennel::faults::ARM_FILE));
            let _ = std::fs::remove_file(dir.join(kennel::faults::PAUSED_FILE));
        }
        self.kubectl.try_run(&["uncordon", NODE_A], None);
    }
}

/// `kubectl drain` of node-a for the set's pods only (the node's other pods are other
/// scenarios'): cordon, then evict. Node-a is uncordoned when the returned guard goes.
#[must_use]
fn drain(cluster: &Cluster, set: &str) -> Restore {
    let restore = Restore {
        kubectl: cluster.kubectl.clone(),
        pause_dir: None,
    };
    cluster.kubectl.run(&[
        "drain",
        NODE_A,
        &format!("--pod-selector=app={set}"),
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=120s",
    ]);
    restore
}

/// The pod Ready on the peer with its claim bound to a volume other than `old_pv`.
fn moved(cluster: &Cluster, ns: &str, pod: &str, old_pv: &str) -> bool {
    let peer = peer_name(cluster);
    let Some(p) = super::cluster_support::workload::pod(cluster, ns, pod) else {
        return false;
    };
    if !running_and_ready(&p) || p["spec"]["nodeName"] != peer.as_str() {
        return false;
    }
    claim_pv(cluster, ns, &format!("www-{pod}")).is_some_and(|pv| name_of(&pv) != old_pv)
}

/// After a migration: the pod on the peer reads hello.txt and the same bytes, the claim's
/// volume lives on the peer only, the old volume, the snapshot and the staging claim are
/// gone, and the claim and the pod carry the migration's events.
fn check_moved(cluster: &Cluster, ns: &str, set: &str, old: &Value, written: &str) {
    let peer = peer_name(cluster);
    let pod = format!("{set}-0");
    let claim = format!("www-{pod}");
    let (old_pv, old_id) = (name_of(old).to_owned(), volume_id(old));
    assert_eq!(
        exec_ok(
            cluster,
            ns,
            &pod,
            &["cat", &format!("{WWW}/hello.txt")],
            None
        )
        .trim(),
        "hello"
    );
    assert_eq!(checksum(cluster, ns, &pod), written, "the moved bytes");
    let pv = claim_pv(cluster, ns, &claim).expect("bound");
    let id = volume_id(&pv);
    assert_eq!(pv_node(&pv).as_deref(), Some(peer.as_str()));
    assert!(
        cluster.peer(&peer).plugin().storage.stored(&id),
        "{id} on {peer}"
    );
    assert!(
        !cluster.plugin().storage.stored(&id),
        "{id} also on {NODE_A}"
    );
    wait_for(
        "the old volume, the snapshot and the staging claim gone; the copy's policy Delete",
        120,
        || {
            let pv = claim_pv(cluster, ns, &claim)?;
            let clean = pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
                && pv["metadata"]["annotations"]["kennel.csi.dev/migration-copy"].is_null();
            (clean
                && cluster.kubectl.get(&["pv", &old_pv]).is_none()
                && !cluster.plugin().storage.stored(&old_id)
                && cluster
                    .kubectl
                    .list(&["volumesnapshot", "-n", ns])
                    .is_empty()
                && cluster
                    .kubectl
                    .list(&["volumesnapshotcontent"])
                    .iter()
                    .all(|c| c["spec"]["volumeSnapshotRef"]["namespace"] != ns))
            .then_some(())
        },
        || describe(cluster, ns) + &retention_tail(cluster),
    );
    let claims: Vec<String> = cluster
        .kubectl
        .list(&["pvc", "-n", ns])
        .iter()
        .map(|c| name_of(c).to_owned())
        .collect();
    assert_eq!(claims, vec![claim.clone()], "only the set's claim is left");
    let bound_to_claim = cluster
        .kubectl
        .list(&["pv"])
        .iter()
        .filter(|v| v["spec"]["claimRef"]["namespace"] == ns)
        .count();
    assert_eq!(bound_to_claim, 1, "one PV for the claim");
    for reason in ["MigrationStarted", "ClaimMoved", "MigrationComplete"] {
        let seen = events(cluster, ns, reason);
        assert!(
            seen.iter().any(|m| m.contains(&claim)),
            "no {reason} event names {claim}: {seen:?}"
        );
    }
    let on_pod = cluster
        .kubectl
        .list(&["events", "-n", ns])
        .iter()
        .filter(|e| e["involvedObject"]["kind"] == "Pod" && e["involvedObject"]["name"] == pod)
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect::<Vec<_>>();
    for reason in ["MigrationStarted", "PodMoved", "MigrationComplete"] {
        assert!(
            on_pod.iter().any(|r| r == reason),
            "pod {pod} has no {reason} event: {on_pod:?}"
        );
    }
    let undone = events(cluster, ns, "MigrationUndone");
    assert!(undone.is_empty(), "a migration was undone: {undone:?}");
    let row = super::placement_of(cluster, ns, &claim).expect("kennel ctl where lists the claim");
    assert_eq!(row["node"], peer.as_str(), "{row}");
    assert!(
        row["moving_to"].is_null() && row["transfer"].is_null(),
        "{row}"
    );
}

/// A drained node's StatefulSet pod starts on the other node with its data; the downtime
/// (eviction to Ready) is reported.
pub fn migrate_on_drain(cluster: &mut Cluster) {
    let ns = namespace(cluster, "migrate");
    let (size, mib) = sizes();
    let (old, written) = set_with_data(cluster, &ns, "web", &size, mib);
    let started = Instant::now();
    let _restore = drain(cluster, "web");
    let old_pv = name_of(&old).to_owned();
    wait_for(
        "web-0 Ready on the other node with a new volume",
        600,
        || moved(cluster, &ns, "web-0", &old_pv).then_some(()),
        || describe(cluster, &ns) + &retention_tail(cluster),
    );
    let downtime = started.elapsed();
    check_moved(cluster, &ns, "web", &old, &written);
    report(&format!(
        "migrate on drain: a {size} claim with {mib} MiB of data moved from {NODE_A} to {}, pod Ready {:.1}s after the drain began",
        peer_name(cluster),
        downtime.as_secs_f64()
    ));
    drop(_restore);
    finish(cluster, &ns);
}

pub fn migrate_survives_controller_kills(cluster: &mut Cluster) {
    migrate_with_kills(cluster, Victim::Controller, "kill-controller");
}

pub fn migrate_survives_source_driver_kills(cluster: &mut Cluster) {
    migrate_with_kills(cluster, Victim::Driver(NODE_A), "kill-source");
}

pub fn migrate_survives_target_driver_kills(cluster: &mut Cluster) {
    let peer: &'static str = Box::leak(peer_name(cluster).into_boxed_str());
    migrate_with_kills(cluster, Victim::Driver(peer), "kill-target");
}

/// A migration where `victim` is SIGKILLed after every step: the controller stops at each
/// step (src/faults.rs), the victim dies and comes back, the controller goes on (or, when it
/// is the victim, a new one starts). Every step is seen, and the claim ends on the other node
/// with its data and nothing left behind.
fn migrate_with_kills(cluster: &mut Cluster, victim: Victim, scenario: &str) {
    let ns = namespace(cluster, scenario);
    let (pause_dir, arm, paused) = pausable_controller(cluster, 1);
    let (size, mib) = sizes();
    let (old, written) = set_with_data(cluster, &ns, "web", &size, mib);
    let old_pv = name_of(&old).to_owned();
    let mut restore = drain(cluster, "web");
    restore.pause_dir = Some(pause_dir.clone());
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen.len() < STEPS.len() {
        assert!(
            Instant::now() < deadline,
            "steps seen with {victim:?} killed after each: {seen:?}\n{}{}",
            describe(cluster, &ns),
            retention_tail(cluster)
        );
        let Ok(step) = std::fs::read_to_string(&paused) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if !seen.contains(&step) {
            seen.push(step.clone());
        }
        if step == step::COPY_REQUESTED {
            // Mid-way, `kennel ctl where` says where the claim is going.
            let row = super::placement_of(cluster, &ns, "www-web-0").expect("listed");
            assert_eq!(row["node"], NODE_A, "{row}");
            assert_eq!(row["moving_to"], peer_name(cluster).as_str(), "{row}");
        }
        match victim {
            Victim::Controller => {
                kill_retention(cluster);
                rearm(&arm, &paused);
                start_retention_pausable(cluster, &pause_dir);
            }
            Victim::Driver(node) => {
                cluster.crash_plugin(node);
                rearm(&arm, &paused);
            }
        }
    }
    let _ = std::fs::remove_file(&arm);
    assert_eq!(seen, STEPS, "the steps, in order");
    wait_for(
        "web-0 Ready on the other node with a new volume",
        300,
        || moved(cluster, &ns, "web-0", &old_pv).then_some(()),
        || describe(cluster, &ns) + &retention_tail(cluster),
    );
    check_moved(cluster, &ns, "web", &old, &written);
    report(&format!(
        "migrate on drain with {victim:?} killed after each of its {} steps: moved, nothing left behind",
        STEPS.len()
    ));
    drop(restore);
    // The next scenarios run with a controller that does not stop.
    start_retention(cluster);
    finish(cluster, &ns);
}

/// Node-a is uncordoned while the copy is under way: the pod goes back to node-a, on its old
/// volume, and the migration is undone — snapshot, staging claim and copy deleted (nothing left
/// on node-b), the old volume's reclaim policy back, a MigrationUndone event — and the data is
/// where it was.
pub fn migrate_undone_on_uncordon(cluster: &mut Cluster) {
    let ns = namespace(cluster, "undo");
    // Held at the third stop: the staging claim was just created.
    let (pause_dir, _, paused) = pausable_controller(cluster, 3);
    let peer = peer_name(cluster);
    let held_on_peer = cluster.peer(&peer).plugin().storage.stored_names();
    let (size, mib) = sizes();
    let (old, written) = set_with_data(cluster, &ns, "web", &size, mib);
    let old_pv = name_of(&old).to_owned();
    let mut restore = drain(cluster, "web");
    restore.pause_dir = Some(pause_dir.clone());
    let step = wait_for(
        "the controller held after requesting the copy",
        120,
        || std::fs::read_to_string(&paused).ok(),
        || describe(cluster, &ns) + &retention_tail(cluster),
    );
    assert_eq!(step, step::COPY_REQUESTED);
    cluster.kubectl.run(&["uncordon", NODE_A]);
    wait_for(
        "web-0 scheduled on node-a again",
        60,
        || (pod_node(cluster, &ns, "web-0").as_deref() == Some(NODE_A)).then_some(()),
        || describe(cluster, &ns),
    );
    std::fs::remove_file(&paused).expect("release the controller");
    wait_for(
        "the migration undone and nothing of it left",
        180,
        || {
            let pv = cluster.kubectl.get(&["pv", &old_pv])?;
            let restored = pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
                && pv["metadata"]["annotations"]["kennel.csi.dev/migration"].is_null();
            let claims = cluster.kubectl.list(&["pvc", "-n", &ns]);
            (restored
                && claims.len() == 1
                && cluster
                    .kubectl
                    .list(&["volumesnapshot", "-n", &ns])
                    .is_empty()
                // Nothing new on node-b (earlier scenarios' volumes may still be going).
                && cluster
                    .peer(&peer)
                    .plugin()
                    .storage
                    .stored_names()
                    .is_subset(&held_on_peer))
            .then_some(())
        },
        || {
            let now = cluster.peer(&peer).plugin().storage.stored_names();
            let new: Vec<&String> = now.difference(&held_on_peer).collect();
            format!(
                "old PV: {}\nnew on {peer}: {new:?}\nsnapshots: {:?}\n{}{}",
                cluster
                    .kubectl
                    .get(&["pv", &old_pv])
                    .map(|pv| pv["metadata"]["annotations"].to_string()
                        + " "
                        + &pv["spec"]["persistentVolumeReclaimPolicy"].to_string())
                    .unwrap_or_default(),
                cluster
                    .kubectl
                    .list(&["volumesnapshot", "-n", &ns])
                    .iter()
                    .map(|v| name_of(v).to_owned())
                    .collect::<Vec<_>>(),
                describe(cluster, &ns),
                retention_tail(cluster)
            )
        },
    );
    wait_pods_ready(cluster, &ns, &["web-0".to_owned()], 120);
    assert_eq!(pod_node(cluster, &ns, "web-0").as_deref(), Some(NODE_A));
    let pv = claim_pv(cluster, &ns, "www-web-0").expect("bound");
    assert_eq!(name_of(&pv), old_pv, "the claim kept its volume");
    assert_eq!(checksum(cluster, &ns, "web-0"), written);
    let undone = events(cluster, &ns, "MigrationUndone");
    assert!(
        undone.iter().any(|m| m.contains("scheduled again")),
        "no MigrationUndone event: {undone:?}"
    );
    assert!(
        events(cluster, &ns, "MigrationComplete").is_empty(),
        "a migration completed"
    );
    drop(restore);
    start_retention(cluster);
    finish(cluster, &ns);
}

/// `kennel retention` restarted to stop at its `nth` step from now: its pause directory, arm
/// file and paused file.
fn pausable_controller(cluster: &mut Cluster, nth: u32) -> (PathBuf, PathBuf, PathBuf) {
    let pause_dir = cluster.root.join("pause-retention");
    std::fs::create_dir_all(&pause_dir).expect("pause dir");
    let (arm, paused) = (
        pause_dir.join(kennel::faults::ARM_FILE),
        pause_dir.join(kennel::faults::PAUSED_FILE),
    );
    let _ = std::fs::remove_file(&paused);
    std::fs::write(&arm, nth.to_string()).expect("arm");
    start_retention_pausable(cluster, &pause_dir);
    (pause_dir, arm, paused)
}

/// Arm the next stop, then let the held step go.
fn rearm(arm: &Path, paused: &Path) {
    std::fs::write(arm, "1").expect("arm");
    std::fs::remove_file(paused).expect("release the step");
}
