//! The driver container killed with `ctr` while it provisions: a clone of a claim in use is
//! being copied (its image exists without its record) and the source's filesystem is frozen
//! for the copy when containerd kills the task. The kubelet restarts the container, the new
//! driver thaws the source and removes the half-built image at start, csi-provisioner's retry
//! makes the clone, and it holds the source's bytes.

use std::time::{Duration, Instant};

use super::*;

/// Bytes of random data in the source claim: a copy long enough to be caught in the middle.
const DATA_MIB: u32 = 256;

/// Images in the loop directory without their record: clones or snapshots being built.
fn half_built(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img") && !p.with_extension("json").exists())
        .collect()
}

pub fn driver_killed_mid_provision(cluster: &mut Cluster) {
    let ns = cluster.namespace("driver-killed");
    let class = Backend::Loop.storage_class();
    let dir = cluster.root.join("loop-deployed");
    cluster.kubectl.apply(
        Some(&ns),
        &claim("source", class, "512Mi", "Filesystem", None),
    );
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("source", "source", false));
    wait_pods_ready(cluster, &ns, &["source".to_owned()], 120);
    exec_ok(
        cluster,
        &ns,
        "source",
        &[
            "dd",
            "if=/dev/urandom",
            &format!("of={DATA}/blob"),
            "bs=1M",
            &format!("count={DATA_MIB}"),
        ],
        None,
    );
    exec_ok(cluster, &ns, "source", &["sync"], None);
    let sum = |pod: &str| {
        exec_ok(
            cluster,
            &ns,
            pod,
            &["sha256sum", &format!("{DATA}/blob")],
            None,
        )
        .split_whitespace()
        .next()
        .expect("a checksum")
        .to_owned()
    };
    let want = sum("source");
    assert!(
        half_built(&dir).is_empty(),
        "half-built images before the clone: {:?}",
        half_built(&dir)
    );

    let pod = node_pod(cluster).expect("the node plugin's pod");
    let pod_name = pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_owned();
    let status = container_status(&pod, "kennel");
    let restarts = status["restartCount"].as_u64().expect("restart count");
    let container = status["containerID"]
        .as_str()
        .expect("container id")
        .trim_start_matches("containerd://")
        .to_owned();
    let pid = nix::unistd::Pid::from_raw(container_pid(cluster, &container));

    let mut clone = claim("clone", class, "512Mi", "Filesystem", None);
    clone["spec"]["dataSource"] = json!({"kind": "PersistentVolumeClaim", "name": "source"});
    cluster.kubectl.apply(Some(&ns), &clone);
    // The class binds on first use: the pod asks for the clone.
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("clone", "clone", false));
    let asked = Instant::now();
    // Stop the driver the moment the clone's image appears, then confirm the copy is unfinished.
    let caught = loop {
        let found = half_built(&dir);
        if !found.is_empty() {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
            break found;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(120),
            "the clone's image never appeared\n{}",
            describe(cluster, &ns) + &diagnose(cluster)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let still = half_built(&dir);
    assert!(
        caught.iter().any(|p| still.contains(p)),
        "the copy finished before the driver stopped: {caught:?}; a larger source is needed"
    );
    run_ok(
        cluster.ctr(&["tasks", "kill", "--signal", "SIGKILL", &container]),
        30,
    );
    let killed = Instant::now();

    let kubectl = cluster.kubectl.clone();
    wait_for(
        "the kubelet to restart the killed driver container",
        120,
        || {
            let pod = kubectl.get(&["pod", &pod_name, "-n", NS])?;
            let status = container_status(&pod, "kennel");
            (status["restartCount"].as_u64()? > restarts && status["ready"] == true).then_some(())
        },
        || diagnose(cluster),
    );
    let restarted = killed.elapsed();
    // The source was frozen for the copy when the driver died: the new driver thaws it.
    exec_ok(
        cluster,
        &ns,
        "source",
        &["touch", &format!("{DATA}/after-the-kill")],
        None,
    );

    wait_pods_ready(cluster, &ns, &["clone".to_owned()], 300);
    let recovered = killed.elapsed();
    assert_same(
        &sum("clone"),
        &want,
        "the clone's copy of the source's data",
    );
    assert!(
        half_built(&dir).is_empty(),
        "half-built images left: {:?}",
        half_built(&dir)
    );
    let source_pv = claim_pv(cluster, &ns, "source").expect("source bound");
    let clone_pv = claim_pv(cluster, &ns, "clone").expect("clone bound");
    assert_ne!(volume_id(&source_pv), volume_id(&clone_pv));
    delete_claims_and_namespace(cluster, &ns);
    report(&format!(
        "driver killed by ctr mid-clone of {DATA_MIB} MiB: container Ready again {:.1}s later, clone's pod Ready {:.1}s after the kill",
        restarted.as_secs_f64(),
        recovered.as_secs_f64()
    ));
}
