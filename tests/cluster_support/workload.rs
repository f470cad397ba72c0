//! The seed walk-through's webserver (`deploy/examples/`) as test
//! workloads, and checks on pods, claims, volumes and the node's mounts.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::kube::{condition, name_of, yaml_documents};
use super::procs::wait_for;
use super::{host, images, Backend, Cluster, DRIVER_NAME, REPO};

/// Where the webserver keeps its files (the example's mount path).
pub const WWW: &str = "/usr/share/nks-mount";

/// `deploy/examples/webserver-statefulset.yaml`'s Service and StatefulSet,
/// with the local busybox serving the volume with `httpd`, the backend's
/// StorageClass and a small claim.
pub fn webserver(backend: Backend, name: &str, replicas: u32) -> (Value, Value) {
    let docs = yaml_documents(&Path::new(REPO).join("deploy/examples/webserver-statefulset.yaml"));
    let mut service = docs
        .iter()
        .find(|d| d["kind"] == "Service")
        .cloned()
        .expect("example Service");
    let mut set = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .cloned()
        .expect("example StatefulSet");
    service["metadata"]["name"] = json!(name);
    service["spec"]["selector"] = json!({"app": name});
    set["metadata"]["name"] = json!(name);
    set["metadata"]["labels"] = json!({"app": name});
    set["spec"]["serviceName"] = json!(name);
    set["spec"]["replicas"] = json!(replicas);
    set["spec"]["selector"]["matchLabels"] = json!({"app": name});
    let template = &mut set["spec"]["template"];
    template["metadata"]["labels"] = json!({"app": name});
    template["spec"]["terminationGracePeriodSeconds"] = json!(2);
    template["spec"]["automountServiceAccountToken"] = json!(false);
    let container = &mut template["spec"]["containers"][0];
    container["image"] = json!(images::BUSYBOX_IMAGE);
    container["imagePullPolicy"] = json!("Never");
    container["command"] = json!(["httpd", "-f", "-p", "8080", "-h", WWW]);
    assert_eq!(
        container["volumeMounts"][0]["mountPath"], WWW,
        "the example's mount path changed"
    );
    let claim = &mut set["spec"]["volumeClaimTemplates"][0];
    claim["spec"]["storageClassName"] = json!(backend.storage_class());
    claim["spec"]["resources"]["requests"]["storage"] = json!("64Mi");
    (service, set)
}

pub fn pod(cluster: &Cluster, ns: &str, name: &str) -> Option<Value> {
    cluster.kubectl.get(&["pod", name, "-n", ns])
}

pub fn running_and_ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && condition(pod, "Ready") == Some("True")
        && pod["metadata"]["deletionTimestamp"].is_null()
}

/// Wait until each named pod is Running and Ready.
#[track_caller]
pub fn wait_pods_ready(cluster: &Cluster, ns: &str, pods: &[String], secs: u64) {
    wait_for(
        &format!("pods {pods:?} Running and Ready in {ns}"),
        secs,
        || {
            pods.iter()
                .all(|p| pod(cluster, ns, p).is_some_and(|v| running_and_ready(&v)))
                .then_some(())
        },
        || describe(cluster, ns),
    );
}

#[track_caller]
pub fn wait_pod_gone(cluster: &Cluster, ns: &str, name: &str, secs: u64) {
    wait_for(
        &format!("pod {ns}/{name} to be gone"),
        secs,
        || pod(cluster, ns, name).is_none().then_some(()),
        || describe(cluster, ns),
    );
}

/// Pods, claims, PVs and events of `ns`, for failure messages.
pub fn describe(cluster: &Cluster, ns: &str) -> String {
    let k = &cluster.kubectl;
    let show = |args: &[&str]| {
        let out = k.try_run(args, None);
        format!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    [
        show(&["get", "pods,pvc,statefulset", "-n", ns, "-o", "wide"]),
        show(&["get", "pv,csistoragecapacity", "-A"]),
        show(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"]),
        // A pod that will not schedule is most often a node's taint or condition.
        show(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} taints={.spec.taints}{'\\n'}{range .status.conditions[*]}  {.type}={.status} {.reason}: {.message}{'\\n'}{end}{end}",
        ]),
        disk_free(),
    ]
    .join("\n")
}

/// Free space where the nodes keep their state: the kubelet taints a full disk.
fn disk_free() -> String {
    let out = std::process::Command::new("df")
        .args(["-h", "/", "/tmp", "/var/lib"])
        .output();
    match out {
        Ok(out) => format!("$ df -h\n{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => format!("$ df -h\n{e}\n"),
    }
}

/// A bound claim's PV.
pub fn claim_pv(cluster: &Cluster, ns: &str, claim: &str) -> Option<Value> {
    let pvc = cluster.kubectl.get(&["pvc", claim, "-n", ns])?;
    if pvc["status"]["phase"] != "Bound" {
        return None;
    }
    let pv = pvc["spec"]["volumeName"].as_str()?;
    cluster.kubectl.get(&["pv", pv])
}

/// The Kennel volume ID behind a PV (asserting the PV is Kennel's).
#[track_caller]
pub fn volume_id(pv: &Value) -> String {
    assert_eq!(
        pv["spec"]["csi"]["driver"],
        DRIVER_NAME,
        "PV {} is not Kennel's",
        name_of(pv)
    );
    pv["spec"]["csi"]["volumeHandle"]
        .as_str()
        .expect("volumeHandle")
        .to_owned()
}

/// The node a PV is pinned to by its node affinity (Kennel's topology key).
pub fn pv_node(pv: &Value) -> Option<String> {
    pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        .as_array()?
        .iter()
        .flat_map(|t| {
            t["matchExpressions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|e| e["key"] == super::TOPOLOGY_KEY)
        .and_then(|e| e["values"][0].as_str().map(str::to_owned))
}

/// Mount points of the kubelet's publish of PV `pv` (any pod).
pub fn publish_mounts(cluster: &Cluster, pv: &str) -> Vec<PathBuf> {
    let suffix = format!("/volumes/kubernetes.io~csi/{pv}/mount");
    host::mounts_under(&cluster.kubelet_root().join("pods"))
        .into_iter()
        .filter(|m| m.to_string_lossy().ends_with(&suffix))
        .collect()
}

/// Mount points of the kubelet's staging of volume `id` (found by the
/// kubelet's `vol_data.json` beside each global mount).
pub fn staging_mounts(cluster: &Cluster, id: &str) -> Vec<PathBuf> {
    let base = cluster
        .kubelet_root()
        .join("plugins/kubernetes.io/csi")
        .join(DRIVER_NAME);
    let mounts = host::mounts_under(&base);
    std::fs::read_dir(&base)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("vol_data.json"))
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                        .is_some_and(|v| v["volumeHandle"] == id)
                })
                .map(|e| e.path().join("globalmount"))
                .filter(|p| mounts.contains(p))
                .collect()
        })
        .unwrap_or_default()
}

/// `kubectl exec` that must succeed; its stdout.
#[track_caller]
pub fn exec_ok(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    cmd: &[&str],
    input: Option<&[u8]>,
) -> String {
    let out = cluster.kubectl.exec(ns, pod, cmd, input);
    assert!(
        out.status.success(),
        "kubectl exec {pod} -- {cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names of `set`'s pods 0..n.
pub fn ordinals(set: &str, n: u32) -> Vec<String> {
    (0..n).map(|i| format!("{set}-{i}")).collect()
}

/// KiB of the filesystem mounted at `path` in `pod`, as `df` there reports it.
#[track_caller]
pub fn df_kib(cluster: &Cluster, ns: &str, pod: &str, path: &str) -> u64 {
    let out = exec_ok(cluster, ns, pod, &["df", "-P", "-k", path], None);
    out.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df in {pod}: {out}"))
}

/// Ask for `size` on claim `claim` (a merge patch of its storage request).
pub fn resize_claim(cluster: &Cluster, ns: &str, claim: &str, size: &str) {
    let patch = json!({"spec": {"resources": {"requests": {"storage": size}}}}).to_string();
    cluster.kubectl.run(&[
        "patch",
        "pvc",
        claim,
        "-n",
        ns,
        "--type=merge",
        "-p",
        &patch,
    ]);
}
