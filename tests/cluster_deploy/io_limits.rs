//! I/O limits through VolumeAttributesClass, as a user changes them: a class named at creation
//! (csi-provisioner's mutable parameters), a new class on a running pod's claim (csi-resizer's
//! ControllerModifyVolume), a class that lifts every limit. Each step is read back from the pod's
//! blkio cgroup on the host and felt by a direct-I/O `dd` in the pod, which cannot finish before
//! its bytes divided by the limit.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

/// Bytes each `dd` moves: 4 MiB, four seconds at 1 MiB/s.
const DD_BYTES: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// The classes: every key stated, as the CSI spec lets a driver act only on keys it is given.
fn classes(ns: &str) -> [(String, [(&'static str, &'static str); 4]); 3] {
    [
        (
            format!("{ns}-slow"),
            [
                ("readBytesPerSecond", "2Mi"),
                ("writeBytesPerSecond", "1Mi"),
                ("readIOPS", "300"),
                ("writeIOPS", "200"),
            ],
        ),
        (
            format!("{ns}-fast"),
            [
                ("readBytesPerSecond", "unlimited"),
                ("writeBytesPerSecond", "4Mi"),
                ("readIOPS", "unlimited"),
                ("writeIOPS", "unlimited"),
            ],
        ),
        (
            format!("{ns}-unlimited"),
            [
                ("readBytesPerSecond", "unlimited"),
                ("writeBytesPerSecond", "unlimited"),
                ("readIOPS", "unlimited"),
                ("writeIOPS", "unlimited"),
            ],
        ),
    ]
}

/// The full path on the loop backend: create with a class, change it on the running pod, survive
/// a driver and a kubelet restart, come back on a new pod's publish, lift every limit.
pub fn io_limits_through_classes(cluster: &mut Cluster) {
    let ns = cluster.namespace("io-limits");
    let [slow, fast, unlimited] = apply_classes(cluster, &ns);
    let class = Backend::Loop.storage_class();
    let pod = start_limited_pod(cluster, &ns, class, &slow, "limited");
    let dev = volume_device(cluster, &ns, "limited");

    assert_rules(
        cluster,
        &ns,
        &pod,
        dev,
        [Some(2 * MIB), Some(MIB), Some(300), Some(200)],
    );
    let slow_write = timed_dd_write(cluster, &ns, &pod, MIB);
    let slow_read = timed_dd_read(cluster, &ns, &pod, 2 * MIB);

    let started = Instant::now();
    switch_class(cluster, &ns, "limited", &fast);
    let modified = started.elapsed();
    assert_rules(cluster, &ns, &pod, dev, [None, Some(4 * MIB), None, None]);
    let fast_write = timed_dd_write(cluster, &ns, &pod, 4 * MIB);

    // The driver and the kubelet restart: the running pod keeps its rules, and a new pod's
    // publish applies the stored limits again.
    let old = node_pod(cluster).expect("node pod")["metadata"]["uid"].clone();
    cluster.kubectl.run(&[
        "delete",
        "pod",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/name=kennel-node",
    ]);
    wait_node_pod_replaced(cluster, &old);
    cluster.stop_kubelet();
    cluster.start_kubelet();
    cluster.wait_node_ready();
    assert_rules(cluster, &ns, &pod, dev, [None, Some(4 * MIB), None, None]);
    cluster
        .kubectl
        .run(&["delete", "pod", &pod, "-n", &ns, "--wait=true"]);
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("limited-again", "limited", false));
    wait_pods_ready(cluster, &ns, &["limited-again".to_owned()], 180);
    let dev = volume_device(cluster, &ns, "limited-again");
    assert_rules(
        cluster,
        &ns,
        "limited-again",
        dev,
        [None, Some(4 * MIB), None, None],
    );
    timed_dd_write(cluster, &ns, "limited-again", 4 * MIB);

    switch_class(cluster, &ns, "limited", &unlimited);
    assert_rules(cluster, &ns, "limited-again", dev, [None; 4]);
    let free_write = measure_dd_write(cluster, &ns, "limited-again");
    assert!(
        free_write < slow_write / 2,
        "without limits a {DD_BYTES}-byte write took {free_write:?}, at 1 MiB/s {slow_write:?}"
    );

    delete_claims_and_namespace(cluster, &ns);
    delete_classes(cluster, &[slow, fast, unlimited]);
    report(&format!(
        "I/O limits (loop): class change applied {:.1}s after the patch; direct writes {} at \
         1 MiB/s, {} at 4 MiB/s, {} unlimited; direct reads {} at 2 MiB/s",
        modified.as_secs_f64(),
        rate(slow_write),
        rate(fast_write),
        rate(free_write),
        rate(slow_read),
    ));
}

/// The same on whatever backend serves `class` (the LVM overlay): created with a class, changed
/// on the running pod, felt by `dd`.
pub fn io_limits_on(cluster: &mut Cluster, class: &str, what: &str) {
    let ns = cluster.namespace(&format!("io-limits-{what}"));
    let [slow, fast, unlimited] = apply_classes(cluster, &ns);
    let pod = start_limited_pod(cluster, &ns, class, &slow, "limited");
    let dev = volume_device(cluster, &ns, "limited");
    assert_rules(
        cluster,
        &ns,
        &pod,
        dev,
        [Some(2 * MIB), Some(MIB), Some(300), Some(200)],
    );
    let slow_write = timed_dd_write(cluster, &ns, &pod, MIB);
    switch_class(cluster, &ns, "limited", &unlimited);
    assert_rules(cluster, &ns, &pod, dev, [None; 4]);
    delete_claims_and_namespace(cluster, &ns);
    delete_classes(cluster, &[slow, fast, unlimited]);
    report(&format!(
        "I/O limits ({what}): direct writes {} at 1 MiB/s",
        rate(slow_write)
    ));
}

fn rate(took: Duration) -> String {
    format!(
        "{:.2} MiB/s",
        DD_BYTES as f64 / MIB as f64 / took.as_secs_f64()
    )
}

fn apply_classes(cluster: &Cluster, ns: &str) -> [String; 3] {
    classes(ns).map(|(name, params)| {
        let params: BTreeMap<&str, &str> = params.into_iter().collect();
        cluster.kubectl.apply(
            None,
            &json!({
                "apiVersion": "storage.k8s.io/v1",
                "kind": "VolumeAttributesClass",
                "metadata": {"name": name},
                "driverName": "kennel.csi.dev",
                "parameters": params,
            }),
        );
        name
    })
}

fn delete_classes(cluster: &Cluster, names: &[String]) {
    for name in names {
        cluster
            .kubectl
            .run(&["delete", "volumeattributesclass", name, "--wait=false"]);
    }
}

/// A claim created with `vac` and a pod using it; the claim's status names the class.
fn start_limited_pod(cluster: &Cluster, ns: &str, class: &str, vac: &str, name: &str) -> String {
    let mut pvc = claim(name, class, "64Mi", "Filesystem", None);
    pvc["spec"]["volumeAttributesClassName"] = json!(vac);
    cluster.kubectl.apply(Some(ns), &pvc);
    cluster
        .kubectl
        .apply(Some(ns), &claim_pod(name, name, false));
    wait_pods_ready(cluster, ns, &[name.to_owned()], 180);
    wait_current_class(cluster, ns, name, vac);
    name.to_owned()
}

/// Name `vac` in the claim and wait until csi-resizer reports it applied.
fn switch_class(cluster: &Cluster, ns: &str, claim: &str, vac: &str) {
    cluster.kubectl.run(&[
        "patch",
        "pvc",
        claim,
        "-n",
        ns,
        "--type=merge",
        "-p",
        &json!({"spec": {"volumeAttributesClassName": vac}}).to_string(),
    ]);
    wait_current_class(cluster, ns, claim, vac);
}

fn wait_current_class(cluster: &Cluster, ns: &str, claim: &str, vac: &str) {
    let kubectl = cluster.kubectl.clone();
    wait_for(
        &format!("claim {claim}'s current VolumeAttributesClass {vac}"),
        180,
        || {
            let pvc = kubectl.get(&["pvc", claim, "-n", ns])?;
            (pvc["status"]["currentVolumeAttributesClassName"] == vac
                && pvc["status"]["modifyVolumeStatus"].is_null())
            .then_some(())
        },
        || describe(cluster, ns) + &diagnose(cluster),
    );
}

/// The device (major, minor) the pod's volume is mounted from, seen from the host.
fn volume_device(cluster: &Cluster, ns: &str, pod: &str) -> (u64, u64) {
    let uid = pod_uid(cluster, ns, pod);
    let mount =
        cluster_support::host::mounts_under(&cluster.kubelet_root().join("pods").join(&uid))
            .into_iter()
            .find(|m| m.to_string_lossy().contains("/volumes/kubernetes.io~csi/"))
            .unwrap_or_else(|| panic!("no CSI mount of pod {pod}"));
    let dev = std::fs::metadata(&mount).expect("stat the mount").dev();
    (libc::major(dev) as u64, libc::minor(dev) as u64)
}

fn pod_uid(cluster: &Cluster, ns: &str, pod: &str) -> String {
    let pod = super::pod(cluster, ns, pod).expect("pod");
    pod["metadata"]["uid"].as_str().expect("uid").to_owned()
}

/// The pod's blkio cgroup under this node's cgroup root (the kubelet's `cgroupRoot`).
fn pod_cgroup(cluster: &Cluster, uid: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup/blkio").join(&cluster.names.cgroup);
    let want = format!("pod{uid}");
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if entry.file_name() == want.as_str() {
                    return entry.path();
                }
                dirs.push(entry.path());
            }
        }
    }
    panic!("no blkio cgroup {want} under {}", root.display())
}

/// The throttle rule of `dev` in one of the cgroup's files, if there is one.
fn rule(cgroup: &Path, file: &str, dev: (u64, u64)) -> Option<u64> {
    let text = std::fs::read_to_string(cgroup.join(file)).expect("read a throttle file");
    let key = format!("{}:{}", dev.0, dev.1);
    text.lines().find_map(|l| {
        let (d, v) = l.split_once(' ')?;
        (d == key).then(|| v.trim().parse().expect("a throttle value"))
    })
}

/// The rules for `dev` are `[read bps, write bps, read iops, write iops]` (None: no rule) on the
/// pod's cgroup and on each of its containers' (cgroup v1 throttles are not hierarchical), waited
/// for briefly (the driver gives new containers their pod's rules every few seconds).
#[track_caller]
fn assert_rules(cluster: &Cluster, ns: &str, pod: &str, dev: (u64, u64), want: [Option<u64>; 4]) {
    let cgroup = pod_cgroup(cluster, &pod_uid(cluster, ns, pod));
    let files = [
        "blkio.throttle.read_bps_device",
        "blkio.throttle.write_bps_device",
        "blkio.throttle.read_iops_device",
        "blkio.throttle.write_iops_device",
    ];
    let cgroups = || {
        let mut all = vec![cgroup.clone()];
        all.extend(
            std::fs::read_dir(&cgroup)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
        all
    };
    let read = || -> Vec<(PathBuf, [Option<u64>; 4])> {
        cgroups()
            .into_iter()
            .map(|c| {
                let rules = files.map(|f| rule(&c, f, dev));
                (c, rules)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = read();
    while (seen.len() < 2 || seen.iter().any(|(_, r)| *r != want)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        seen = read();
    }
    assert!(
        seen.len() >= 2 && seen.iter().all(|(_, r)| *r == want),
        "pod {pod}'s blkio rules for {}:{} ({files:?}) want {want:?} on the pod and every          container: {seen:#?}",
        dev.0,
        dev.1,
    );
}

fn measure_dd_write(cluster: &Cluster, ns: &str, pod: &str) -> Duration {
    let started = Instant::now();
    exec_ok(
        cluster,
        ns,
        pod,
        &[
            "dd",
            "if=/dev/zero",
            &format!("of={DATA}/throttled"),
            "bs=64k",
            &format!("count={}", DD_BYTES / (64 << 10)),
            "oflag=direct",
        ],
        None,
    );
    started.elapsed()
}

/// A direct write of [`DD_BYTES`] in the pod takes at least its bytes over `limit`.
#[track_caller]
fn timed_dd_write(cluster: &Cluster, ns: &str, pod: &str, limit: u64) -> Duration {
    let took = measure_dd_write(cluster, ns, pod);
    let floor = Duration::from_secs_f64(DD_BYTES as f64 / limit as f64);
    assert!(
        took >= floor,
        "a {DD_BYTES}-byte direct write took {took:?} under a {limit} B/s limit"
    );
    took
}

/// A direct read of the file [`timed_dd_write`] wrote takes at least its bytes over `limit`.
#[track_caller]
fn timed_dd_read(cluster: &Cluster, ns: &str, pod: &str, limit: u64) -> Duration {
    let started = Instant::now();
    exec_ok(
        cluster,
        ns,
        pod,
        &[
            "dd",
            &format!("if={DATA}/throttled"),
            "of=/dev/null",
            "bs=64k",
            "iflag=direct",
        ],
        None,
    );
    let took = started.elapsed();
    let floor = Duration::from_secs_f64(DD_BYTES as f64 / limit as f64);
    assert!(
        took >= floor,
        "a {DD_BYTES}-byte direct read took {took:?} under a {limit} B/s limit"
    );
    took
}
