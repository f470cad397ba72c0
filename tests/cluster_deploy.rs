//! Kennel the way users run it: its image (`hack/image.sh` from the `Dockerfile`), the
//! kubernetes-csi sidecars' images, and `kubectl apply -k` of an overlay of `deploy/` that
//! changes nothing but where the kubelet keeps its files (and the loop images live, with no
//! reserve kept free) on this test node, on Kubernetes v1.36 with kube-proxy giving pods the
//! API server. The node DaemonSet runs every container it lists, the retention Deployment runs under its
//! ServiceAccount, and the seed walk-through passes through that deployment, on the loop overlay
//! and on the LVM overlay. A rolling update of the node DaemonSet under writing pods breaks no
//! write and no mount; snapshots (the optional snapshot-controller component), online expansion,
//! raw Block claims, I/O limits through VolumeAttributesClasses (on both backends) and the
//! liveness probe work through the real sidecars.

mod cluster_support;
#[path = "cluster_deploy/driver_killed.rs"]
mod driver_killed;
#[path = "cluster_deploy/io_limits.rs"]
mod io_limits;

use std::path::{Path, PathBuf};
use std::time::Instant;

use cluster_support::procs::{run_ok, wait_for};
use cluster_support::workload::*;
use cluster_support::{images, report, run_scenarios, Backend, Cluster, ClusterOpts, REPO};
use serde_json::{json, Value};

const NS: &str = "kennel-system";

#[test]
fn deploy_as_shipped() {
    run_scenarios(
        ClusterOpts {
            deployed: true,
            ..ClusterOpts::default()
        },
        Backend::Loop,
        &[
            ("apply-to-ready", apply_to_ready),
            ("seed-through-deploy", seed_through_deploy),
            ("rolling-update", rolling_update),
            ("snapshot-restore", snapshot_restore),
            ("expand-online", expand_online),
            ("raw-block", raw_block),
            (
                "io-limits-through-classes",
                io_limits::io_limits_through_classes,
            ),
            (
                "liveness-restarts-hung-driver",
                liveness_restarts_hung_driver,
            ),
            (
                "driver-killed-mid-provision",
                driver_killed::driver_killed_mid_provision,
            ),
            ("seed-through-deploy-lvm", seed_through_deploy_lvm),
        ],
    );
}

/// `path` relative to `base` (kustomize refuses absolute resource paths).
fn relative(path: &Path, base: &Path) -> PathBuf {
    let path: Vec<_> = path.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..base.len() {
        out.push("..");
    }
    out.extend(&path[common..]);
    out
}

/// Where the shipped DaemonSet's host paths live on this node (lvm2's own stay the host's).
fn host_path(cluster: &Cluster, shipped: &str) -> Option<String> {
    let kubelet = cluster.kubelet_root().display().to_string();
    let loop_dir = cluster.root.join("loop-deployed").display().to_string();
    if let Some(rest) = shipped.strip_prefix("/var/lib/kubelet") {
        return Some(format!("{kubelet}{rest}"));
    }
    // The LVM overlay's per-VG locks: the run's own, so nothing is left on the host.
    if let Some(rest) = shipped.strip_prefix("/run/kennel") {
        return Some(format!(
            "{}{rest}",
            cluster.root.join("kennel-locks").display()
        ));
    }
    shipped
        .strip_prefix("/var/lib/kennel/loop")
        .map(|rest| format!("{loop_dir}{rest}"))
}

/// JSON patch ops moving the DaemonSet's kubelet and loop paths to this node's, the same path
/// inside the containers as on the host (the kubelet names host paths in its CSI calls).
fn path_ops(cluster: &Cluster, ds: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    let spec = &ds["spec"]["template"]["spec"];
    for (i, v) in spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .enumerate()
    {
        if let Some(path) = v["hostPath"]["path"]
            .as_str()
            .and_then(|p| host_path(cluster, p))
        {
            ops.push(json!({"op": "replace", "path": format!("/spec/template/spec/volumes/{i}/hostPath/path"), "value": path}));
        }
    }
    for (c, container) in spec["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .enumerate()
    {
        for (m, mount) in container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(path) = mount["mountPath"]
                .as_str()
                .and_then(|p| host_path(cluster, p))
            {
                ops.push(json!({"op": "replace", "path": format!("/spec/template/spec/containers/{c}/volumeMounts/{m}/mountPath"), "value": path}));
            }
        }
        for (a, arg) in container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let arg = arg.as_str().expect("arg");
            let Some((flag, value)) = arg.split_once('=') else {
                continue;
            };
            if let Some(path) = host_path(cluster, value) {
                ops.push(json!({"op": "replace", "path": format!("/spec/template/spec/containers/{c}/args/{a}"), "value": format!("{flag}={path}")}));
            }
        }
    }
    ops.push(json!({"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": format!("--kubelet-dir={}", cluster.kubelet_root().display())}));
    // The kubelet here keeps its pods' cgroups under its own cgroupRoot, not the host's top.
    ops.push(json!({"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": format!("--blkio-cgroup-dir=/sys/fs/cgroup/blkio/{}", cluster.names.cgroup)}));
    // The loop pool's default reserve (5% of the filesystem, at most 10 GiB) would leave no room
    // on a test machine's nearly full disk: every pod would stay Pending. The pool is the room left.
    if spec["containers"][0]["args"]
        .as_array()
        .is_some_and(|a| a.iter().any(|a| a == "--backend=loop"))
    {
        ops.push(json!({"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--reserve=0"}));
    }
    ops
}

/// An overlay of `base` (deploy/ or one of its overlays) with the snapshot component, as a
/// user adds it, and `ops` on the node DaemonSet (this node's paths); nothing else changes.
fn write_overlay(cluster: &Cluster, name: &str, base: &Path, ops: Vec<Value>) -> PathBuf {
    let overlay = cluster.root.join(name);
    std::fs::create_dir_all(&overlay).expect("overlay dir");
    std::fs::write(
        overlay.join("node-paths.json"),
        serde_json::to_string_pretty(&ops).expect("json"),
    )
    .expect("write patch");
    let base = std::fs::canonicalize(base).expect("deploy dir");
    let component =
        std::fs::canonicalize(Path::new(REPO).join("deploy/components/snapshot-controller"))
            .expect("snapshot component");
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "# This node's kubelet directory and loop directory, and snapshot support as a user\n# adds it; nothing else changes.\nresources:\n  - {}\ncomponents:\n  - {}\npatches:\n  - path: node-paths.json\n    target:\n      group: apps\n      version: v1\n      kind: DaemonSet\n      name: kennel-node\n",
            relative(&base, &overlay).display(),
            relative(&component, &overlay).display()
        ),
    )
    .expect("write kustomization");
    overlay
}

fn rendered(cluster: &Cluster, dir: &Path) -> Vec<Value> {
    let yaml = cluster
        .kubectl
        .run(&["kustomize", dir.to_str().expect("utf-8 path")]);
    cluster_support::kube::yaml_str_documents(&yaml)
}

fn images_of(docs: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for doc in docs {
        for c in doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let image = c["image"].as_str().expect("image").to_owned();
            if !out.contains(&image) {
                out.push(image);
            }
        }
    }
    out
}

/// The images `deploy/` names, made here: Kennel's by hack/image.sh, each sidecar's from its
/// binary in shared/k8s/csi (the same release: deploy/ pins what the tests run).
fn make_images(cluster: &mut Cluster, docs: &[Value]) {
    let work = cluster.root.join("images");
    std::fs::create_dir_all(&work).expect("images dir");
    for image in images_of(docs) {
        let started = Instant::now();
        let archive = if image.contains("/kennel:") {
            let archive = work.join("kennel.tar");
            let mut cmd = std::process::Command::new(Path::new(REPO).join("hack/image.sh"));
            cmd.arg("--binary")
                .arg(env!("CARGO_BIN_EXE_kennel"))
                .arg("--tag")
                .arg(&image)
                .arg("--output")
                .arg(&archive);
            run_ok(cmd, 900);
            archive
        } else {
            let (repo, tag) = image.rsplit_once(':').expect("tagged image");
            let name = repo.rsplit('/').next().expect("image name");
            let bin = cluster_support::bins::install(
                cluster_support::K8s::V1_36,
                &[name],
                &cluster.root.join("bin"),
            )
            .remove(name)
            .expect("sidecar binary");
            if name != "livenessprobe" {
                let mut version = std::process::Command::new(&bin);
                version.arg("--version");
                let out = run_ok(version, 30);
                assert!(
                    out.contains(tag),
                    "deploy/ names {image}, the binary is {out}"
                );
            }
            images::binary_archive(&work, name, &bin, &image)
        };
        cluster.import_image(&archive);
        report(&format!(
            "image {image} made and imported in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
    }
}

/// kennel-system's objects, and the last lines of every container (its previous run too).
fn diagnose(cluster: &Cluster) -> String {
    let mut out = describe(cluster, NS);
    for pod in cluster.kubectl.list(&["pods", "-n", NS]) {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        for status in pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let container = status["name"].as_str().unwrap_or_default();
            for previous in ["--previous=false", "--previous=true"] {
                let logs = cluster.kubectl.try_run(
                    &[
                        "logs",
                        "-n",
                        NS,
                        name,
                        "-c",
                        container,
                        "--tail=15",
                        previous,
                    ],
                    None,
                );
                out.push_str(&format!(
                    "---- {name}/{container} {previous}\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                ));
            }
        }
    }
    out
}

fn apply_to_ready(cluster: &mut Cluster) {
    let deploy = Path::new(REPO).join("deploy");
    let shipped = rendered(cluster, &deploy);
    // This cluster has no snapshot support: the CRDs first, as the component says.
    let component = std::fs::canonicalize(deploy.join("components/snapshot-controller"))
        .expect("snapshot component");
    cluster_support::snapshots::install_crds(&cluster.kubectl, &component);

    let ds = shipped
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("node DaemonSet");
    let overlay = write_overlay(cluster, "deploy-overlay", &deploy, path_ops(cluster, ds));
    // Nothing but paths differ from what users apply: every shipped object is there unchanged
    // (the DaemonSet but for its paths), and the rest is the component's.
    let ours = rendered(cluster, &overlay);
    let key = |d: &Value| (d["kind"].clone(), d["metadata"]["name"].clone());
    for doc in &shipped {
        let mine = ours
            .iter()
            .find(|o| key(o) == key(doc))
            .unwrap_or_else(|| panic!("{:?} missing from the overlay", key(doc)));
        if doc["kind"] != "DaemonSet" {
            assert_eq!(mine, doc, "{:?} changed by the overlay", key(doc));
        }
    }
    let component_docs: Vec<Value> = ["crd", "."]
        .iter()
        .flat_map(|dir| std::fs::read_dir(component.join(dir)).expect("component dir"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .flat_map(|p| cluster_support::kube::yaml_documents(&p))
        .collect();
    assert_eq!(ours.len(), shipped.len() + component_docs.len());
    for doc in &component_docs {
        assert!(ours.iter().any(|o| key(o) == key(doc)), "{:?}", key(doc));
    }
    make_images(cluster, &ours);

    let started = Instant::now();
    cluster
        .kubectl
        .run(&["apply", "-k", overlay.to_str().expect("utf-8 path")]);
    let node = cluster.node_name.clone();
    let kubectl = cluster.kubectl.clone();
    wait_for(
        "the kennel-node pod Ready with every container running",
        300,
        || {
            let pods =
                kubectl.get(&["pods", "-n", NS, "-l", "app.kubernetes.io/name=kennel-node"])?;
            let pod = pods["items"].as_array()?.first()?.clone();
            running_and_ready(&pod).then_some(())
        },
        || diagnose(cluster),
    );
    let node_ready = started.elapsed();
    wait_for(
        &format!("kennel.csi.dev registered in CSINode {node}"),
        120,
        || {
            let csinode = kubectl.get(&["csinode", &node])?;
            csinode["spec"]["drivers"]
                .as_array()?
                .iter()
                .any(|d| d["name"] == "kennel.csi.dev")
                .then_some(())
        },
        || diagnose(cluster),
    );
    let registered = started.elapsed();
    wait_for(
        "the kennel-retention pod Ready",
        300,
        || {
            let pods = kubectl.get(&[
                "pods",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/name=kennel-retention",
            ])?;
            let pod = pods["items"].as_array()?.first()?.clone();
            running_and_ready(&pod).then_some(())
        },
        || diagnose(cluster),
    );
    wait_for(
        "the snapshot-controller Deployment available",
        300,
        || {
            let d = kubectl.get(&["deployment", "snapshot-controller", "-n", "kube-system"])?;
            (d["status"]["availableReplicas"].as_u64()? == d["spec"]["replicas"].as_u64()?)
                .then_some(())
        },
        || describe(cluster, "kube-system"),
    );
    report(&format!(
        "apply -k to node plugin Ready {:.1}s, driver registered {:.1}s, retention and snapshot-controller Ready {:.1}s",
        node_ready.as_secs_f64(),
        registered.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    // Every container the DaemonSet lists runs, none restarted.
    let pods = kubectl
        .get(&["pods", "-n", NS, "-l", "app.kubernetes.io/name=kennel-node"])
        .expect("node pods");
    let pod = &pods["items"][0];
    let listed = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .len();
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .expect("container statuses");
    assert_eq!(statuses.len(), listed);
    for s in statuses {
        assert!(
            s["state"]["running"].is_object() && s["ready"] == true,
            "{} is not running and ready: {s}",
            s["name"]
        );
        assert_eq!(s["restartCount"], 0, "{} restarted: {s}", s["name"]);
    }
    // The retention controller reached the API server from its pod, under its ServiceAccount.
    let retention_pod = kubectl
        .get(&[
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/name=kennel-retention",
        ])
        .expect("retention pods")["items"][0]["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_owned();
    let log = cluster.kubectl.run(&["logs", "-n", NS, &retention_pod]);
    assert!(
        log.contains("built-in StatefulSet retention") && log.contains("leading"),
        "kennel retention did not start against the API server:\n{log}"
    );
}

const HELLO: &str = "hello from webserver-2\n";

fn seed_through_deploy(cluster: &mut Cluster) {
    let loop_dir = cluster.root.join("loop-deployed");
    seed_walk_through(cluster, "seed-deployed", Backend::Loop, &|id| {
        loop_dir.join(format!("{id}.img")).exists()
    });
}

/// The seed walk-through on `backend`'s class through the deployment: three replicas, each its
/// own volume (`stored` says the backend holds it) published once; hello.txt written on
/// webserver-2; 3 -> 2 unpublishes and keeps claim and volume; 2 -> 3 brings back the same volume
/// and the file; the set and claims deleted, and the volumes with them.
fn seed_walk_through(
    cluster: &mut Cluster,
    scenario: &str,
    backend: Backend,
    stored: &dyn Fn(&str) -> bool,
) {
    let ns = cluster.namespace(scenario);
    let (service, set) = webserver(backend, "webserver", 3);
    cluster.kubectl.apply(Some(&ns), &service);
    cluster.kubectl.apply(Some(&ns), &set);
    let pods = ordinals("webserver", 3);
    wait_pods_ready(cluster, &ns, &pods, 240);
    let mut volumes = Vec::new();
    for i in 0..3 {
        let claim = format!("www-webserver-{i}");
        let pv = claim_pv(cluster, &ns, &claim).unwrap_or_else(|| panic!("{claim} is not bound"));
        let id = volume_id(&pv);
        assert!(
            stored(&id),
            "{claim}'s volume {id} is not in the backend's storage"
        );
        let pv_name = pv["metadata"]["name"].as_str().expect("pv name").to_owned();
        assert_eq!(
            publish_mounts(cluster, &pv_name).len(),
            1,
            "{claim}: publish mount"
        );
        volumes.push((pv_name, id));
    }
    exec_ok(
        cluster,
        &ns,
        "webserver-2",
        &["tee", &format!("{WWW}/hello.txt")],
        Some(HELLO.as_bytes()),
    );
    scale(cluster, &ns, 2);
    wait_pod_gone(cluster, &ns, "webserver-2", 120);
    let (pv2, id2) = volumes[2].clone();
    wait_for(
        "webserver-2's volume unpublished",
        60,
        || publish_mounts(cluster, &pv2).is_empty().then_some(()),
        || describe(cluster, &ns),
    );
    assert!(stored(&id2), "{id2} kept");
    scale(cluster, &ns, 3);
    wait_pods_ready(cluster, &ns, &pods, 120);
    let back = claim_pv(cluster, &ns, "www-webserver-2").expect("claim bound");
    assert_eq!(back["metadata"]["name"], pv2.as_str());
    let text = exec_ok(
        cluster,
        &ns,
        "webserver-2",
        &["cat", &format!("{WWW}/hello.txt")],
        None,
    );
    assert_eq!(text, HELLO);
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
            || (cluster.kubectl.get(&["pv", pv]).is_none() && !stored(id)).then_some(()),
            || describe(cluster, &ns),
        );
    }
    cluster
        .kubectl
        .run(&["delete", "namespace", &ns, "--wait=false"]);
}

fn scale(cluster: &Cluster, ns: &str, replicas: u32) {
    cluster.kubectl.run(&[
        "scale",
        "statefulset",
        "webserver",
        "-n",
        ns,
        &format!("--replicas={replicas}"),
    ]);
}

/// The node plugin's pod (the one node's).
fn node_pod(cluster: &Cluster) -> Option<Value> {
    let pods =
        cluster
            .kubectl
            .get(&["pods", "-n", NS, "-l", "app.kubernetes.io/name=kennel-node"])?;
    match pods["items"].as_array()?.as_slice() {
        [pod] => Some(pod.clone()),
        _ => None,
    }
}

fn container_status<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

/// A writer's loop: one numbered line a 100 ms, each synced to the volume, exiting non-zero on
/// the first failed write or sync, or when the volume is no longer mounted (writes would land
/// in the container's own filesystem).
fn writer_script() -> String {
    format!(
        "i=0; while :; do \
           grep -q ' {WWW} ' /proc/mounts || {{ echo \"{WWW} unmounted at $i\" >&2; exit 2; }}; \
           echo $i >> {WWW}/writes.log || {{ echo \"write $i failed\" >&2; exit 1; }}; \
           sync {WWW}/writes.log || {{ echo \"sync $i failed\" >&2; exit 1; }}; \
           i=$((i+1)); usleep 100000; \
         done"
    )
}

/// The lines a writer has synced, checked to be 0, 1, 2, … without a gap.
#[track_caller]
fn written_lines(cluster: &Cluster, ns: &str, pod: &str) -> usize {
    let log = exec_ok(
        cluster,
        ns,
        pod,
        &["cat", &format!("{WWW}/writes.log")],
        None,
    );
    let numbers: Vec<usize> = log
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("{pod}: bad line {l:?}"))
        })
        .collect();
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(*n, i, "{pod}: line {i} is {n}: a write went missing");
    }
    numbers.len()
}

/// Each writer still runs its first container: no write failed, no mount went away.
#[track_caller]
fn assert_writers_unbroken(cluster: &Cluster, ns: &str, pods: &[String]) {
    for name in pods {
        let pod = pod(cluster, ns, name).unwrap_or_else(|| panic!("{name} is gone"));
        let status = container_status(&pod, "webserver");
        assert!(
            status["state"]["running"].is_object() && status["restartCount"] == 0,
            "{name}'s writer stopped (a write failed or its volume went away): {status}\n{}",
            String::from_utf8_lossy(
                &cluster
                    .kubectl
                    .try_run(&["logs", "-n", ns, name, "--previous"], None)
                    .stdout
            )
        );
    }
}

/// A rolling update of the node DaemonSet to a new image tag while every webserver pod writes
/// to its volume: no write fails, every mount stays, the new driver serves the old volumes (a
/// deleted pod comes back with its data) and provisions new ones.
fn rolling_update(cluster: &mut Cluster) {
    let ds = cluster
        .kubectl
        .get(&["daemonset", "kennel-node", "-n", NS])
        .expect("node DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    // The driver may finish its running lvm2/mkfs work before it goes (data-safety).
    assert_eq!(spec["terminationGracePeriodSeconds"], 600);
    let image = spec["containers"][0]["image"]
        .as_str()
        .expect("driver image")
        .to_owned();
    let (repo, _) = image.rsplit_once(':').expect("tagged image");
    let next = format!("{repo}:rollout");
    run_ok(cluster.ctr(&["images", "tag", &image, &next]), 60);

    let ns = cluster.namespace("rolling-update");
    let (service, mut set) = webserver(Backend::Loop, "writer", 2);
    set["spec"]["template"]["spec"]["containers"][0]["command"] =
        json!(["sh", "-c", writer_script()]);
    cluster.kubectl.apply(Some(&ns), &service);
    cluster.kubectl.apply(Some(&ns), &set);
    let pods = ordinals("writer", 2);
    wait_pods_ready(cluster, &ns, &pods, 240);
    let mut volumes = Vec::new();
    for i in 0..2 {
        let pv = claim_pv(cluster, &ns, &format!("www-writer-{i}")).expect("claim bound");
        volumes.push((
            pv["metadata"]["name"].as_str().expect("pv name").to_owned(),
            volume_id(&pv),
        ));
    }
    let old = node_pod(cluster).expect("the node plugin's pod");
    let old_uid = old["metadata"]["uid"].clone();
    let before: Vec<usize> = pods
        .iter()
        .map(|p| written_lines(cluster, &ns, p))
        .collect();

    let started = Instant::now();
    cluster.kubectl.run(&[
        "set",
        "image",
        "daemonset/kennel-node",
        "-n",
        NS,
        &format!("kennel={next}"),
        &format!("orphans={next}"),
    ]);
    wait_for(
        "the updated node plugin pod Ready with every container running",
        300,
        || {
            let pod = node_pod(cluster)?;
            (pod["metadata"]["uid"] != old_uid
                // The spec: the runtime reports one tag of the image, either of the two.
                && pod["spec"]["containers"][0]["image"] == next.as_str()
                && running_and_ready(&pod)
                && pod["status"]["containerStatuses"]
                    .as_array()?
                    .iter()
                    .all(|s| s["ready"] == true))
            .then_some(())
        },
        || diagnose(cluster),
    );
    let rolled = started.elapsed();
    // The writers kept writing through the update and after it.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_writers_unbroken(cluster, &ns, &pods);
    for (p, before) in pods.iter().zip(&before) {
        let now = written_lines(cluster, &ns, p);
        assert!(
            now >= before + rolled.as_secs() as usize,
            "{p} wrote {} lines in {:.0}s of update",
            now - before,
            rolled.as_secs_f64()
        );
    }
    for (pv, id) in &volumes {
        assert_eq!(
            publish_mounts(cluster, pv).len(),
            1,
            "{pv} ({id}) lost its publish mount"
        );
        assert_eq!(
            staging_mounts(cluster, id).len(),
            1,
            "{id} lost its staging"
        );
    }

    // The new driver serves the old volumes: writer-0 leaves (unpublish, unstage) and comes
    // back (stage, publish) with everything it wrote.
    let kept = written_lines(cluster, &ns, "writer-0");
    cluster
        .kubectl
        .run(&["delete", "pod", "writer-0", "-n", &ns, "--wait=true"]);
    wait_pods_ready(cluster, &ns, &pods[..1], 120);
    let log = exec_ok(
        cluster,
        &ns,
        "writer-0",
        &["cat", &format!("{WWW}/writes.log")],
        None,
    );
    let expected: String = (0..kept).map(|i| format!("{i}\n")).collect();
    assert!(
        log.starts_with(&expected),
        "writer-0 came back without the {kept} lines it wrote"
    );
    // … and provisions a new one.
    cluster
        .kubectl
        .run(&["scale", "statefulset", "writer", "-n", &ns, "--replicas=3"]);
    let all = ordinals("writer", 3);
    wait_pods_ready(cluster, &ns, &all, 120);
    assert_writers_unbroken(cluster, &ns, &all[1..]);
    report(&format!(
        "rolling update of the node plugin: {:.1}s from set image to the new pod Ready, writers unbroken",
        rolled.as_secs_f64()
    ));
    delete_set_and_volumes(cluster, &ns, "writer");
}

/// Delete a StatefulSet, its claims and namespace; wait until their volumes are gone.
fn delete_set_and_volumes(cluster: &Cluster, ns: &str, set: &str) {
    let mut volumes = Vec::new();
    for pvc in cluster.kubectl.list(&["pvc", "-n", ns]) {
        let claim = pvc["metadata"]["name"].as_str().expect("claim name");
        if let Some(pv) = claim_pv(cluster, ns, claim) {
            volumes.push((
                pv["metadata"]["name"].as_str().expect("pv name").to_owned(),
                volume_id(&pv),
            ));
        }
    }
    cluster
        .kubectl
        .run(&["delete", "statefulset", set, "-n", ns, "--wait=true"]);
    cluster
        .kubectl
        .run(&["delete", "pvc", "--all", "-n", ns, "--wait=false"]);
    wait_volumes_gone(cluster, ns, &volumes);
    cluster
        .kubectl
        .run(&["delete", "namespace", ns, "--wait=false"]);
}

/// Wait until each (PV, volume ID) is gone from the API and from the DaemonSet's loop directory.
fn wait_volumes_gone(cluster: &Cluster, ns: &str, volumes: &[(String, String)]) {
    let loop_dir = cluster.root.join("loop-deployed");
    for (pv, id) in volumes {
        wait_for(
            &format!("PV {pv} and volume {id} deleted"),
            120,
            || {
                (cluster.kubectl.get(&["pv", pv]).is_none()
                    && !loop_dir.join(format!("{id}.img")).exists())
                .then_some(())
            },
            || describe(cluster, ns),
        );
    }
}

/// A claim of `class` (`mode` Filesystem or Block), optionally restored from `snapshot`.
fn claim(name: &str, class: &str, size: &str, mode: &str, snapshot: Option<&str>) -> Value {
    let mut pvc = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "volumeMode": mode,
            "resources": {"requests": {"storage": size}},
        },
    });
    if let Some(snapshot) = snapshot {
        pvc["spec"]["dataSource"] = json!({
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": snapshot,
        });
    }
    pvc
}

/// Where a claim appears in [`claim_pod`]'s pod: a directory, or a device for a Block claim.
const DATA: &str = "/data";
const DEVICE: &str = "/dev/xvda";

/// A busybox pod that idles with `claim` mounted at [`DATA`] (or, `block`, as [`DEVICE`]).
fn claim_pod(name: &str, claim: &str, block: bool) -> Value {
    let mut container = json!({
        "name": "app",
        "image": images::BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sleep", "3600"],
    });
    if block {
        container["volumeDevices"] = json!([{"name": "data", "devicePath": DEVICE}]);
    } else {
        container["volumeMounts"] = json!([{"name": "data", "mountPath": DATA}]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": false,
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    })
}

/// The (PV, volume ID) of each bound claim in `ns`.
fn bound_volumes(cluster: &Cluster, ns: &str) -> Vec<(String, String)> {
    cluster
        .kubectl
        .list(&["pvc", "-n", ns])
        .iter()
        .filter_map(|pvc| claim_pv(cluster, ns, pvc["metadata"]["name"].as_str()?))
        .map(|pv| {
            (
                pv["metadata"]["name"].as_str().expect("pv name").to_owned(),
                volume_id(&pv),
            )
        })
        .collect()
}

/// Delete every pod and claim of `ns`, wait until their volumes are gone, delete `ns`.
fn delete_claims_and_namespace(cluster: &Cluster, ns: &str) {
    let volumes = bound_volumes(cluster, ns);
    cluster
        .kubectl
        .run(&["delete", "pods", "--all", "-n", ns, "--wait=true"]);
    cluster
        .kubectl
        .run(&["delete", "pvc", "--all", "-n", ns, "--wait=false"]);
    wait_volumes_gone(cluster, ns, &volumes);
    cluster
        .kubectl
        .run(&["delete", "namespace", ns, "--wait=false"]);
}

const MARKER: &str = "written before the snapshot\n";

/// A VolumeSnapshot of a claim through the snapshot-controller and each node's csi-snapshotter,
/// a new claim restored from it in a new pod, then snapshot and claims deleted with their
/// backend volumes.
fn snapshot_restore(cluster: &mut Cluster) {
    let ns = cluster.namespace("snapshot-restore");
    let class = Backend::Loop.storage_class();
    cluster.kubectl.apply(
        Some(&ns),
        &claim("source", class, "64Mi", "Filesystem", None),
    );
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("source", "source", false));
    wait_pods_ready(cluster, &ns, &["source".to_owned()], 120);
    exec_ok(
        cluster,
        &ns,
        "source",
        &["tee", &format!("{DATA}/marker")],
        Some(MARKER.as_bytes()),
    );
    exec_ok(cluster, &ns, "source", &["sync"], None);
    let started = Instant::now();
    cluster.kubectl.apply(
        Some(&ns),
        &json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": "snap"},
            "spec": {
                "volumeSnapshotClassName": "kennel",
                "source": {"persistentVolumeClaimName": "source"},
            },
        }),
    );
    let kubectl = cluster.kubectl.clone();
    let content = wait_for(
        "VolumeSnapshot snap ready to use",
        120,
        || {
            let snap = kubectl.get(&["volumesnapshot", "snap", "-n", &ns])?;
            (snap["status"]["readyToUse"] == true).then(|| {
                snap["status"]["boundVolumeSnapshotContentName"]
                    .as_str()
                    .expect("content name")
                    .to_owned()
            })
        },
        || describe(cluster, &ns) + &diagnose(cluster),
    );
    let snapshotted = started.elapsed();
    let handle = kubectl
        .get(&["volumesnapshotcontent", &content])
        .expect("content")["status"]["snapshotHandle"]
        .as_str()
        .expect("snapshot handle")
        .to_owned();
    // The handle names the node that holds the snapshot; its image is named by the bare ID.
    let (bare, holder) = handle
        .split_once('@')
        .expect("a node-named snapshot handle");
    assert_eq!(holder, cluster.node_name, "{handle}");
    let snapshot_image = cluster
        .root
        .join("loop-deployed/snapshots")
        .join(format!("{bare}.img"));
    assert!(
        snapshot_image.exists(),
        "snapshot {handle} has no image in the DaemonSet's loop directory"
    );

    cluster.kubectl.apply(
        Some(&ns),
        &claim("restored", class, "64Mi", "Filesystem", Some("snap")),
    );
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("restored", "restored", false));
    wait_pods_ready(cluster, &ns, &["restored".to_owned()], 120);
    let restored = started.elapsed();
    let source_pv = claim_pv(cluster, &ns, "source").expect("source bound");
    let restored_pv = claim_pv(cluster, &ns, "restored").expect("restored bound");
    assert_ne!(volume_id(&source_pv), volume_id(&restored_pv));
    let text = exec_ok(
        cluster,
        &ns,
        "restored",
        &["cat", &format!("{DATA}/marker")],
        None,
    );
    assert_eq!(text, MARKER);

    cluster.kubectl.run(&[
        "delete",
        "volumesnapshot",
        "snap",
        "-n",
        &ns,
        "--wait=false",
    ]);
    wait_for(
        &format!("VolumeSnapshotContent {content} and snapshot {handle} deleted"),
        120,
        || {
            (kubectl.get(&["volumesnapshotcontent", &content]).is_none()
                && !snapshot_image.exists())
            .then_some(())
        },
        || describe(cluster, &ns) + &diagnose(cluster),
    );
    delete_claims_and_namespace(cluster, &ns);
    report(&format!(
        "snapshot ready {:.1}s after its VolumeSnapshot, restored claim's pod Ready {:.1}s after",
        snapshotted.as_secs_f64(),
        restored.as_secs_f64()
    ));
}

/// A running pod's claim on an xfs class grown by patching the claim: csi-resizer expands the
/// volume (ControllerExpandVolume), the kubelet grows the mounted filesystem (NodeExpandVolume,
/// `xfs_growfs`), the pod sees the new size and the claim's status says it.
fn expand_online(cluster: &mut Cluster) {
    let ns = cluster.namespace("expand-online");
    let class = format!("{ns}-xfs");
    cluster.kubectl.apply(
        None,
        &json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": class},
            "provisioner": "kennel.csi.dev",
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": true,
            "reclaimPolicy": "Delete",
            "parameters": {"csi.storage.k8s.io/fstype": "xfs", "mkfsDiscard": "false"},
        }),
    );
    // xfs needs 300 MiB.
    cluster.kubectl.apply(
        Some(&ns),
        &claim("grow", &class, "300Mi", "Filesystem", None),
    );
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("grow", "grow", false));
    wait_pods_ready(cluster, &ns, &["grow".to_owned()], 180);
    let before = df_kib(cluster, &ns, "grow", DATA);
    let started = Instant::now();
    resize_claim(cluster, &ns, "grow", "400Mi");
    let kubectl = cluster.kubectl.clone();
    wait_for(
        "claim grow's status.capacity at 400Mi",
        180,
        || {
            let pvc = kubectl.get(&["pvc", "grow", "-n", &ns])?;
            (pvc["status"]["capacity"]["storage"] == "400Mi").then_some(())
        },
        || describe(cluster, &ns) + &diagnose(cluster),
    );
    let grown = started.elapsed();
    let after = df_kib(cluster, &ns, "grow", DATA);
    assert!(
        after >= before + 90 * 1024,
        "the pod sees {after} KiB after growing 300Mi to 400Mi (was {before} KiB)"
    );
    let pv = claim_pv(cluster, &ns, "grow").expect("claim bound");
    assert_eq!(pv["spec"]["capacity"]["storage"], "400Mi");
    // The pod kept running through it.
    let pod = pod(cluster, &ns, "grow").expect("pod");
    assert_eq!(container_status(&pod, "app")["restartCount"], 0);
    delete_claims_and_namespace(cluster, &ns);
    cluster.kubectl.run(&["delete", "storageclass", &class]);
    report(&format!(
        "online xfs growth 300Mi -> 400Mi: claim status updated {:.1}s after the patch, df {before} -> {after} KiB",
        grown.as_secs_f64()
    ));
}

/// A raw Block claim: the pod gets a device node, bytes written through it with dd read back,
/// also from a new pod after the volume was unpublished and unstaged.
fn raw_block(cluster: &mut Cluster) {
    let ns = cluster.namespace("raw-block");
    let class = Backend::Loop.storage_class();
    cluster
        .kubectl
        .apply(Some(&ns), &claim("raw", class, "64Mi", "Block", None));
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("raw", "raw", true));
    wait_pods_ready(cluster, &ns, &["raw".to_owned()], 120);
    exec_ok(cluster, &ns, "raw", &["test", "-b", DEVICE], None);
    // 1 MiB of numbered lines, 3 MiB into the device.
    let pattern: String = (0..)
        .map(|i| format!("block {i:09}\n"))
        .take((1 << 20) / 16)
        .collect();
    assert_eq!(pattern.len(), 1 << 20);
    let read_back = |pod: &str| {
        exec_ok(
            cluster,
            &ns,
            pod,
            &[
                "dd",
                &format!("if={DEVICE}"),
                "bs=4096",
                "skip=768",
                "count=256",
            ],
            None,
        )
    };
    // Written in the pod: through kubectl exec's stdin only the first 192 KiB arrived here.
    exec_ok(
        cluster,
        &ns,
        "raw",
        &[
            "sh",
            "-c",
            &format!(
                "awk 'BEGIN {{ for (i = 0; i < 65536; i++) printf \"block %09d\\n\", i }}' \
                 | dd of={DEVICE} bs=4096 seek=768 iflag=fullblock conv=fsync"
            ),
        ],
        None,
    );
    assert_same(&read_back("raw"), &pattern, "read back through the device");
    let pv = claim_pv(cluster, &ns, "raw").expect("claim bound");
    assert_eq!(pv["spec"]["volumeMode"], "Block");
    cluster
        .kubectl
        .run(&["delete", "pod", "raw", "-n", &ns, "--wait=true"]);
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("raw-again", "raw", true));
    wait_pods_ready(cluster, &ns, &["raw-again".to_owned()], 120);
    assert_same(&read_back("raw-again"), &pattern, "read by a second pod");
    delete_claims_and_namespace(cluster, &ns);
}

/// Equal texts, or a panic naming the first difference (not a megabyte of both).
#[track_caller]
fn assert_same(got: &str, want: &str, what: &str) {
    if got == want {
        return;
    }
    let at = got
        .bytes()
        .zip(want.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let context = |s: &str| {
        s.get(at.saturating_sub(16)..(at + 32).min(s.len()))
            .unwrap_or("")
            .to_owned()
    };
    panic!(
        "{what}: {} bytes, expected {}; first difference at {at}: {:?} instead of {:?}",
        got.len(),
        want.len(),
        context(got),
        context(want)
    );
}

/// The host PID of a running container's init process, from containerd's task list.
fn container_pid(cluster: &Cluster, container_id: &str) -> i32 {
    let id = container_id
        .strip_prefix("containerd://")
        .unwrap_or(container_id);
    let tasks = run_ok(cluster.ctr(&["tasks", "ls"]), 30);
    tasks
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next()? == id).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no task {id} in\n{tasks}"))
}

/// A driver that stops answering (SIGSTOP from the host) fails livenessprobe's Probe; the
/// kubelet restarts that container (the probe's own grace period, not the pod's 600 s, since a
/// stopped process never acts on SIGTERM) and the restarted driver provisions and mounts.
fn liveness_restarts_hung_driver(cluster: &mut Cluster) {
    let ds = cluster
        .kubectl
        .get(&["daemonset", "kennel-node", "-n", NS])
        .expect("node DaemonSet");
    let probe_grace = ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("the driver's liveness probe has its own grace period");
    let pod = node_pod(cluster).expect("the node plugin's pod");
    let pod_name = pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_owned();
    let status = container_status(&pod, "kennel");
    assert!(status["ready"] == true, "driver not ready: {status}");
    let restarts = status["restartCount"].as_u64().expect("restart count");
    let pid = container_pid(
        cluster,
        status["containerID"].as_str().expect("container id"),
    );
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the driver");
    let kubectl = cluster.kubectl.clone();
    wait_for(
        "the kubelet to restart the hung driver container",
        // Five failed probes 10 s apart, the probe's grace period, and room for this machine.
        90 + probe_grace,
        || {
            let pod = kubectl.get(&["pod", &pod_name, "-n", NS])?;
            let status = container_status(&pod, "kennel");
            (status["restartCount"].as_u64()? > restarts
                && status["state"]["running"].is_object()
                && status["ready"] == true)
                .then_some(())
        },
        || diagnose(cluster),
    );
    let restarted = started.elapsed();
    let pod = node_pod(cluster).expect("the node plugin's pod");
    assert_eq!(pod["metadata"]["name"], pod_name.as_str(), "the same pod");
    let events = cluster.kubectl.run(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        &format!("involvedObject.name={pod_name},reason=Unhealthy"),
        "-o",
        "json",
    ]);
    assert!(
        events.contains("Liveness probe failed"),
        "the restart was not the liveness probe's: {events}"
    );
    // The restarted driver serves: a new claim provisions, stages and mounts.
    let ns = cluster.namespace("liveness");
    cluster.kubectl.apply(
        Some(&ns),
        &claim(
            "after",
            Backend::Loop.storage_class(),
            "64Mi",
            "Filesystem",
            None,
        ),
    );
    cluster
        .kubectl
        .apply(Some(&ns), &claim_pod("after", "after", false));
    wait_pods_ready(cluster, &ns, &["after".to_owned()], 120);
    exec_ok(
        cluster,
        &ns,
        "after",
        &["touch", &format!("{DATA}/ok")],
        None,
    );
    delete_claims_and_namespace(cluster, &ns);
    report(&format!(
        "hung driver restarted by its liveness probe {:.1}s after SIGSTOP",
        restarted.as_secs_f64()
    ));
}

/// The node DaemonSet's pod replaced (a new template) and Ready with every container.
fn wait_node_pod_replaced(cluster: &Cluster, old_uid: &Value) {
    wait_for(
        "the replaced node plugin pod Ready with every container running",
        300,
        || {
            let pod = node_pod(cluster)?;
            (pod["metadata"]["uid"] != *old_uid
                && running_and_ready(&pod)
                && pod["status"]["containerStatuses"]
                    .as_array()?
                    .iter()
                    .all(|s| s["ready"] == true))
            .then_some(())
        },
        || diagnose(cluster),
    );
}

/// deploy/overlays/lvm applied the same way (its volume group named, as its README asks): the
/// DaemonSet moves to the LVM backend, lvm2 runs in the driver's container, and the seed
/// walk-through passes on LVs. Then back to the loop overlay.
fn seed_through_deploy_lvm(cluster: &mut Cluster) {
    let vg = cluster_support::vg::TestVg::with_capacity(1 << 30);
    let lvm = Path::new(REPO).join("deploy/overlays/lvm");
    let shipped = rendered(cluster, &lvm);
    let ds = shipped
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("node DaemonSet");
    let mut ops = path_ops(cluster, ds);
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args");
    let at = args
        .iter()
        .position(|a| a == "--volume-group=kennel")
        .expect("the overlay's --volume-group");
    ops.push(json!({"op": "replace", "path": format!("/spec/template/spec/containers/0/args/{at}"), "value": format!("--volume-group={}", vg.name)}));
    let overlay = write_overlay(cluster, "deploy-overlay-lvm", &lvm, ops);
    let old = node_pod(cluster).expect("node pod")["metadata"]["uid"].clone();
    let started = Instant::now();
    cluster
        .kubectl
        .run(&["apply", "-k", overlay.to_str().expect("utf-8 path")]);
    wait_node_pod_replaced(cluster, &old);
    report(&format!(
        "LVM overlay applied: node plugin Ready {:.1}s after apply -k",
        started.elapsed().as_secs_f64()
    ));

    seed_walk_through(cluster, "seed-deployed-lvm", Backend::Lvm, &|id| {
        vg.lv(id).is_some()
    });
    io_limits::io_limits_on(cluster, Backend::Lvm.storage_class(), "lvm");
    // Back to the loop overlay before the volume group goes.
    let old = node_pod(cluster).expect("node pod")["metadata"]["uid"].clone();
    let overlay = cluster.root.join("deploy-overlay");
    cluster
        .kubectl
        .run(&["apply", "-k", overlay.to_str().expect("utf-8 path")]);
    wait_node_pod_replaced(cluster, &old);
    drop(vg);
}
