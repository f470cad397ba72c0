//! The README's seed walk-through against a real one-node cluster (API
//! server, controller manager, scheduler, kubelet, containerd) with
//! Kennel's node plugin: on the loop backend, then on LVM.

mod cluster_support;

use cluster_support::procs::wait_for;
use cluster_support::workload::*;
use cluster_support::{run_scenarios, Backend, Cluster, ClusterOpts};

#[test]
fn seed_walkthrough_on_a_real_node() {
    run_scenarios(
        ClusterOpts::default(),
        Backend::Loop,
        &[("seed-loop", seed_loop), ("seed-lvm", seed_lvm)],
    );
}

fn seed_loop(cluster: &mut Cluster) {
    seed(cluster, Backend::Loop);
}

fn seed_lvm(cluster: &mut Cluster) {
    seed(cluster, Backend::Lvm);
}

const HELLO: &str = "hello from webserver-2\n";

fn seed(cluster: &mut Cluster, backend: Backend) {
    cluster.use_backend(backend);
    let ns = cluster.namespace(&format!("seed-{backend:?}"));
    let (service, set) = webserver(backend, "webserver", 3);
    cluster.kubectl.apply(Some(&ns), &service);
    cluster.kubectl.apply(Some(&ns), &set);
    let pods = ordinals("webserver", 3);
    wait_pods_ready(cluster, &ns, &pods, 240);

    // One Kennel volume per pod, on this node, staged and published.
    let mut volumes = Vec::new();
    for i in 0..3 {
        let claim = format!("www-webserver-{i}");
        let pv = claim_pv(cluster, &ns, &claim).unwrap_or_else(|| panic!("{claim} is not bound"));
        let id = volume_id(&pv);
        assert_eq!(
            pv_node(&pv).as_deref(),
            Some(cluster.node_name.as_str()),
            "{claim}'s PV is not pinned to the node"
        );
        assert!(
            cluster.plugin().storage.stored(&id),
            "{claim}'s volume {id} has no storage on the host"
        );
        let pv_name = pv["metadata"]["name"].as_str().expect("pv name").to_owned();
        assert_eq!(
            publish_mounts(cluster, &pv_name).len(),
            1,
            "{claim}: publish mount"
        );
        assert_eq!(
            staging_mounts(cluster, &id).len(),
            1,
            "{claim}: staging mount"
        );
        assert_eq!(
            cluster.plugin().storage.attachments(&id).len(),
            1,
            "{claim}: loop device"
        );
        volumes.push((pv_name, id));
    }
    let distinct: std::collections::BTreeSet<_> = volumes.iter().map(|(_, id)| id).collect();
    assert_eq!(
        distinct.len(),
        3,
        "each pod has its own volume: {volumes:?}"
    );

    exec_ok(
        cluster,
        &ns,
        "webserver-2",
        &["tee", &format!("{WWW}/hello.txt")],
        Some(HELLO.as_bytes()),
    );

    // 3 -> 2: the pod goes, the kubelet unpublishes and unstages, the
    // driver detaches the loop device; the claim and its data stay.
    cluster.kubectl.run(&[
        "scale",
        "statefulset",
        "webserver",
        "-n",
        &ns,
        "--replicas=2",
    ]);
    wait_pod_gone(cluster, &ns, "webserver-2", 120);
    let (pv2, id2) = volumes[2].clone();
    wait_for(
        "webserver-2's volume unpublished, unstaged and detached",
        60,
        || {
            (publish_mounts(cluster, &pv2).is_empty()
                && staging_mounts(cluster, &id2).is_empty()
                && cluster.plugin().storage.attachments(&id2).is_empty())
            .then_some(())
        },
        || describe(cluster, &ns),
    );
    let kept =
        claim_pv(cluster, &ns, "www-webserver-2").expect("claim www-webserver-2 kept and bound");
    assert_eq!(kept["metadata"]["name"], pv2.as_str());
    assert!(
        cluster.plugin().storage.stored(&id2),
        "volume {id2} kept on the host"
    );
    for (pv, id) in &volumes[..2] {
        assert_eq!(publish_mounts(cluster, pv).len(), 1, "{pv} still published");
        assert_eq!(
            cluster.plugin().storage.attachments(id).len(),
            1,
            "{id} still attached"
        );
    }

    // 2 -> 3: the same claim and data come back.
    cluster.kubectl.run(&[
        "scale",
        "statefulset",
        "webserver",
        "-n",
        &ns,
        "--replicas=3",
    ]);
    wait_pods_ready(cluster, &ns, &pods, 120);
    let back = claim_pv(cluster, &ns, "www-webserver-2").expect("claim bound");
    assert_eq!(
        back["metadata"]["name"],
        pv2.as_str(),
        "webserver-2 got another volume"
    );
    let text = exec_ok(
        cluster,
        &ns,
        "webserver-2",
        &["cat", &format!("{WWW}/hello.txt")],
        None,
    );
    assert_eq!(text, HELLO);

    // Delete the set and the claims: every volume goes through DeleteVolume.
    let deletes_before = cluster.plugin().rpc_ok_count("DeleteVolume");
    cluster.kubectl.run(&[
        "delete",
        "statefulset",
        "webserver",
        "-n",
        &ns,
        "--wait=true",
    ]);
    cluster
        .kubectl
        .run(&["delete", "pvc", "--all", "-n", &ns, "--wait=false"]);
    for (pv, id) in &volumes {
        wait_for(
            &format!("PV {pv} and volume {id} deleted"),
            120,
            || {
                (cluster.kubectl.get(&["pv", pv]).is_none() && !cluster.plugin().storage.stored(id))
                    .then_some(())
            },
            || describe(cluster, &ns),
        );
        assert!(
            cluster.plugin().storage.attachments(id).is_empty(),
            "{id} still attached"
        );
        assert!(
            cluster.plugin().driver_log().contains(id.as_str()),
            "driver log never names {id}"
        );
    }
    // The provisioner may retry a DeleteVolume that already succeeded (CSI
    // makes it idempotent), so at least one OK call per volume.
    let deletes = cluster.plugin().rpc_ok_count("DeleteVolume") - deletes_before;
    assert!(
        deletes >= 3,
        "only {deletes} DeleteVolume calls answered OK for three volumes"
    );
    cluster
        .kubectl
        .run(&["delete", "namespace", &ns, "--wait=false"]);
}
