//! deploy/ without a cluster: every document parses into its k8s-openapi type and survives a
//! round trip unchanged (a misspelt key fails), the kustomizations render with the real
//! `kubectl kustomize` of the Kubernetes release the cluster tests run, and the rendered objects
//! agree with each other and with the driver's flags.
//! The RBAC tests check each ClusterRole against what its component calls, rule by rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[allow(dead_code)]
#[path = "cluster_support/bins.rs"]
mod bins;
#[allow(dead_code)]
#[path = "common/skip.rs"]
mod skip;

const DRIVER_NAME: &str = "kennel.csi.dev";
const NAMESPACE: &str = "kennel-system";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read deploy dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file as JSON values (empty documents skipped).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Paths where two JSON values differ.
fn diff(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                match (x.get(key), y.get(key)) {
                    (Some(p), Some(q)) => diff(p, q, &format!("{at}.{key}"), out),
                    (Some(_), None) => out.push(format!("{at}.{key} lost")),
                    // Embedded objects (claim templates) gain their type's apiVersion and kind.
                    (None, Some(_)) if key == "apiVersion" || key == "kind" => {}
                    (None, Some(_)) => out.push(format!("{at}.{key} added")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(p, q, &format!("{at}[{i}]"), out);
            }
        }
        // A schema's integer bound is a float in its type (`minimum: 0` becomes 0.0).
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a != b => out.push(format!("{at}: {a} became {b}")),
        _ => {}
    }
}

/// Parse into `T`, serialize again and demand the same JSON: nothing unknown, nothing dropped.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not parse as its kind: {e}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    let mut problems = Vec::new();
    diff(doc, &back, "", &mut problems);
    assert!(
        problems.is_empty(),
        "{origin}: fields not kept by the typed object (misspelt or misplaced?):\n  {}",
        problems.join("\n  ")
    );
    typed
}

/// `kustomize.config.k8s.io/v1beta1` Kustomization, only the fields deploy/ uses.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    patches: Vec<KustomizePatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    labels: Vec<KustomizeLabels>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KustomizePatch {
    path: String,
    target: PatchTarget,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PatchTarget {
    group: String,
    version: String,
    kind: String,
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KustomizeLabels {
    pairs: BTreeMap<String, String>,
}

/// One RFC 6902 operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchOp {
    op: String,
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Value>,
}

/// `snapshot.storage.k8s.io/v1` VolumeSnapshotClass (a CRD, not in k8s-openapi).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VolumeSnapshotClass {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    driver: String,
    deletion_policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<String, String>>,
}

fn kind_of(doc: &Value) -> (String, String) {
    let s = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    (s("apiVersion"), s("kind"))
}

fn name_of(doc: &Value) -> String {
    doc.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// Check one Kubernetes document against its type.
fn check_document(doc: &Value, origin: &str) {
    let (api, kind) = kind_of(doc);
    match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => drop(round_trip::<Namespace>(doc, origin)),
        ("v1", "ServiceAccount") => drop(round_trip::<ServiceAccount>(doc, origin)),
        ("v1", "Service") => drop(round_trip::<Service>(doc, origin)),
        ("apps/v1", "DaemonSet") => drop(round_trip::<DaemonSet>(doc, origin)),
        ("apps/v1", "Deployment") => drop(round_trip::<Deployment>(doc, origin)),
        ("apps/v1", "StatefulSet") => drop(round_trip::<StatefulSet>(doc, origin)),
        ("storage.k8s.io/v1", "CSIDriver") => drop(round_trip::<CSIDriver>(doc, origin)),
        ("storage.k8s.io/v1", "StorageClass") => drop(round_trip::<StorageClass>(doc, origin)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            drop(round_trip::<ClusterRole>(doc, origin))
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            drop(round_trip::<ClusterRoleBinding>(doc, origin))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => drop(round_trip::<Role>(doc, origin)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            drop(round_trip::<RoleBinding>(doc, origin))
        }
        ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass") => {
            drop(round_trip::<VolumeSnapshotClass>(doc, origin))
        }
        ("kustomize.config.k8s.io/v1beta1", "Kustomization")
        | ("kustomize.config.k8s.io/v1alpha1", "Component") => {
            drop(round_trip::<Kustomization>(doc, origin))
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            drop(round_trip::<CustomResourceDefinition>(doc, origin))
        }
        other => panic!("{origin}: no type known for {other:?}; add it to tests/manifests.rs"),
    }
}

#[test]
fn every_document_round_trips_through_its_type() {
    let files = yaml_files(&deploy_dir());
    assert!(
        files.len() >= 10,
        "expected the deploy tree, found {files:?}"
    );
    let mut kinds = BTreeSet::new();
    for file in &files {
        let origin = file.display().to_string();
        let docs = documents(file);
        assert!(!docs.is_empty(), "{origin} is empty");
        for doc in docs {
            if let Value::Array(ops) = &doc {
                // A JSON patch file (referenced from a kustomization).
                for op in ops {
                    round_trip::<PatchOp>(op, &origin);
                }
                continue;
            }
            kinds.insert(kind_of(&doc).1);
            check_document(&doc, &origin);
        }
    }
    for kind in [
        "CSIDriver",
        "StorageClass",
        "DaemonSet",
        "Deployment",
        "StatefulSet",
        "Service",
        "ClusterRole",
        "VolumeSnapshotClass",
        "Kustomization",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/");
    }
}

#[test]
fn a_misspelt_key_is_caught() {
    let doc: Value = serde_json::json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": "x"},
        "provisioner": DRIVER_NAME,
        "volumeBindingMod": "WaitForFirstConsumer",
    });
    let caught = std::panic::catch_unwind(|| check_document(&doc, "inline"));
    assert!(caught.is_err(), "volumeBindingMod must not pass");
}

/// kubectl v1.36 (kustomize v5.8), decompressed once into the target's temp dir; None (after a
/// loud skip) where it cannot be found.
fn kubectl() -> Option<PathBuf> {
    static KUBECTL: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let found = KUBECTL.get_or_init(|| {
        if let Some(why) = bins::missing(bins::K8s::V1_36, &["kubectl"]) {
            return Err(why);
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubectl-v1.36");
        let work = dir.join(format!("tmp-{}", std::process::id()));
        let binary = bins::install(bins::K8s::V1_36, &["kubectl"], &work)
            .remove("kubectl")
            .expect("kubectl installed");
        if !binary.starts_with(&work) {
            let _ = std::fs::remove_dir_all(&work);
            return Ok(binary);
        }
        // Parallel test processes each decompress; the rename makes one of them the copy.
        let path = dir.join("kubectl");
        std::fs::rename(&binary, &path).expect("place kubectl");
        let _ = std::fs::remove_dir_all(&work);
        Ok(path)
    });
    match found {
        Ok(path) => Some(path.clone()),
        Err(why) => {
            skip::cannot_run(why);
            None
        }
    }
}

/// `kubectl kustomize dir`: what `kubectl apply -k dir` would send. None when the test must
/// stop (kubectl missing and skips allowed).
fn render(dir: &Path) -> Option<Vec<Value>> {
    let kubectl = kubectl()?;
    let out = std::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| {
                let value = serde_yaml::Value::deserialize(doc).expect("kustomize output is YAML");
                serde_json::to_value(value).expect("kustomize output is JSON-compatible")
            })
            .filter(|v| !v.is_null())
            .collect(),
    )
}

fn overlays() -> Option<Vec<(&'static str, Vec<Value>)>> {
    ["loop", "lvm"]
        .into_iter()
        .map(|o| Some((o, render(&deploy_dir().join("overlays").join(o))?)))
        .collect()
}

fn find<T: DeserializeOwned + Serialize>(docs: &[Value], kind: &str, name: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| kind_of(d).1 == kind && name_of(d) == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    round_trip(doc, &format!("rendered {kind} {name}"))
}

fn all<T: DeserializeOwned + Serialize>(docs: &[Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| kind_of(d).1 == kind)
        .map(|d| round_trip(d, &format!("rendered {kind} {}", name_of(d))))
        .collect()
}

#[test]
fn kustomizations_reference_existing_files_and_render() {
    for dir in [
        deploy_dir(),
        deploy_dir().join("base"),
        deploy_dir().join("overlays/loop"),
        deploy_dir().join("overlays/lvm"),
    ] {
        let Some(docs) = render(&dir) else { return };
        assert!(!docs.is_empty(), "{} renders nothing", dir.display());
        let mut seen = BTreeSet::new();
        for doc in &docs {
            check_document(doc, &format!("{} (rendered)", dir.display()));
            let key = (kind_of(doc), name_of(doc));
            assert!(
                seen.insert(key.clone()),
                "{key:?} twice in {}",
                dir.display()
            );
        }
    }
    // Every YAML file under base/ and the overlays is used by its kustomization.
    for dir in ["base", "overlays/loop", "overlays/lvm"] {
        let dir = deploy_dir().join(dir);
        let k: Kustomization =
            serde_json::from_value(documents(&dir.join("kustomization.yaml")).remove(0)).unwrap();
        let used: BTreeSet<String> = k
            .resources
            .iter()
            .cloned()
            .chain(k.patches.iter().map(|p| p.path.clone()))
            .collect();
        for file in std::fs::read_dir(&dir).unwrap() {
            let name = file.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                assert!(
                    used.contains(&name),
                    "{}/{name} is not referenced",
                    dir.display()
                );
            }
        }
    }
}

fn pod(ds: &DaemonSet) -> PodSpec {
    ds.spec.clone().unwrap().template.spec.unwrap()
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

/// The value of `--flag=value` in a container's args.
fn flag(c: &Container, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args(c)
        .iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// The port a container's HTTP server listens on, from its flags.
fn served_port(c: &Container) -> Option<i32> {
    let addr = flag(c, "metrics-addr").or_else(|| flag(c, "http-endpoint"))?;
    addr.rsplit_once(':')?.1.parse().ok()
}

/// Every port a container listens on, from its flags: its HTTP server's and the driver's peer
/// channel (`--peer-listen`).
fn served_ports(c: &Container) -> Vec<i32> {
    let peer = flag(c, "peer-listen").and_then(|a| a.rsplit_once(':')?.1.parse().ok());
    served_port(c).into_iter().chain(peer).collect()
}

/// A probe's port as a number, resolving names against the container's ports.
fn port_number(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("{}: no port named {name}", c.name))
                .container_port
        }
    }
}

#[derive(Parser)]
struct Cli {
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per container to check its flags: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    Driver(kennel::driver::DriverArgs),
    Retention(kennel::retention::RetentionArgs),
}

/// The args as the kubelet hands them over: `$(VAR)` of a field reference replaced by a value
/// of its kind (the node's name, the pod's IP).
fn expanded_args(c: &Container) -> Vec<String> {
    let mut out = args(c);
    for e in c.env.iter().flatten() {
        let path = e
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let value = match path {
            Some("spec.nodeName") => "node-1",
            Some("status.podIP") => "10.244.1.7",
            _ => continue,
        };
        for a in &mut out {
            *a = a.replace(&format!("$({})", e.name), value);
        }
    }
    out
}

fn parse_kennel_args(c: &Container) -> Result<Command, clap::Error> {
    Cli::try_parse_from(std::iter::once("kennel".to_owned()).chain(expanded_args(c)))
        .map(|cli| cli.command)
}

fn backend_known(name: &str) -> bool {
    <kennel::driver::BackendKind as clap::ValueEnum>::from_str(name, true).is_ok()
}

#[test]
fn node_daemonset_is_consistent() {
    let Some(overlays) = overlays() else { return };
    for (overlay, docs) in overlays {
        let ds: DaemonSet = find(&docs, "DaemonSet", "kennel-node");
        let pod = pod(&ds);
        let kennel = &pod.containers[0];
        assert_eq!(kennel.name, "kennel", "the overlays patch container 0");

        // The driver's flags are the real parser's.
        match parse_kennel_args(kennel) {
            Ok(Command::Driver(a)) => {
                assert_eq!(a.driver_name, DRIVER_NAME);
                assert!(a.metrics_addr.is_some(), "{overlay}: no --metrics-addr");
                // Restore anywhere: the peer channel on all addresses, reached at the pod's IP.
                let listen = a.peer_listen.expect("--peer-listen");
                assert!(listen.ip().is_unspecified(), "{overlay}: {listen}");
                assert!(
                    a.peer_advertise_ip.is_some(),
                    "{overlay}: no --peer-advertise-ip"
                );
            }
            Ok(Command::Retention(_)) => panic!("{overlay}: driver container runs retention"),
            Err(e) if !backend_known(overlay) => {
                panic!("{overlay}: overlay names a backend this build does not know: {e}")
            }
            Err(e) => panic!("{overlay}: kennel driver flags do not parse: {e}"),
        }
        assert_eq!(flag(kennel, "backend").as_deref(), Some(overlay));

        // Socket: the driver's endpoint, each sidecar's --csi-address, the kubelet's path.
        let endpoint = flag(kennel, "endpoint").expect("--endpoint");
        let socket = endpoint.strip_prefix("unix://").expect("unix endpoint");
        let (socket_dir, socket_file) = socket.rsplit_once('/').unwrap();
        let mount_of = |c: &Container, path: &str| {
            c.volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == path)
                .map(|m| m.name.clone())
        };
        let socket_volume = mount_of(kennel, socket_dir).expect("socket dir mounted in kennel");
        for c in &pod.containers[1..] {
            // Kennel's own clients name the socket as the driver does (--endpoint).
            let address = if c.name == "orphans" {
                flag(c, "endpoint").map(|e| e.trim_start_matches("unix://").to_owned())
            } else {
                flag(c, "csi-address")
            };
            assert_eq!(address.as_deref(), Some(socket), "{}: CSI socket", c.name);
            assert_eq!(
                mount_of(c, socket_dir).as_ref(),
                Some(&socket_volume),
                "{}: socket dir",
                c.name
            );
        }
        let host_dir = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == socket_volume)
            .and_then(|v| v.host_path.clone())
            .expect("socket dir is a hostPath")
            .path;
        assert_eq!(host_dir, format!("/var/lib/kubelet/plugins/{DRIVER_NAME}"));
        let registrar = container(&pod, "node-driver-registrar");
        assert_eq!(
            flag(registrar, "kubelet-registration-path"),
            Some(format!("{host_dir}/{socket_file}"))
        );
        let registration = mount_of(registrar, "/registration").expect("registration mount");
        let reg_host = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == registration)
            .and_then(|v| v.host_path.clone())
            .unwrap()
            .path;
        assert_eq!(reg_host, "/var/lib/kubelet/plugins_registry");

        // Host mounts: /dev, the kubelet dir with Bidirectional propagation, the backend's dirs.
        let mounts: BTreeMap<String, Option<String>> = kennel
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.clone(), m.mount_propagation.clone()))
            .collect();
        assert_eq!(
            mounts.get("/var/lib/kubelet"),
            Some(&Some("Bidirectional".to_owned()))
        );
        assert!(mounts.contains_key("/dev"));
        // The host's machine ID, read-only: without it every volume would record the image's.
        // The host's /etc is mounted, not the file: a file hostPath (type File) keeps the pod
        // from starting on a host without one, where the driver has a fallback.
        let machine_id_file = flag(kennel, "machine-id-file").expect("--machine-id-file");
        let host_etc = kennel
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| Path::new(&machine_id_file).parent() == Some(Path::new(&m.mount_path)))
            .unwrap_or_else(|| panic!("{overlay}: {machine_id_file}'s directory is not mounted"));
        assert_eq!(
            host_etc.read_only,
            Some(true),
            "{overlay}: the host's /etc is read-only"
        );
        let host_etc_path = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == host_etc.name)
            .and_then(|v| v.host_path.clone())
            .expect("the host's /etc is a hostPath");
        assert_eq!(host_etc_path.path, "/etc");
        assert_eq!(host_etc_path.type_.as_deref(), Some("Directory"));
        assert!(
            machine_id_file.ends_with("/machine-id"),
            "{machine_id_file}"
        );
        let backend_mounts: &[&str] = match overlay {
            "loop" => &["/var/lib/kennel/loop"],
            _ => &["/etc/lvm", "/run/lvm"],
        };
        for m in backend_mounts {
            assert!(mounts.contains_key(*m), "{overlay}: {m} not mounted");
        }
        if overlay == "loop" {
            assert_eq!(
                flag(kennel, "loop-dir").as_deref(),
                Some("/var/lib/kennel/loop")
            );
        } else {
            assert!(flag(kennel, "volume-group").is_some());
        }
        for m in kennel.volume_mounts.iter().flatten() {
            let v = pod.volumes.iter().flatten().find(|v| v.name == m.name);
            assert!(v.is_some(), "{overlay}: mount {} has no volume", m.name);
        }

        // Privileged only where it must be; every container has requests and limits.
        for c in &pod.containers {
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            assert_eq!(privileged, c.name == "kennel", "{}: privileged", c.name);
            let r = c.resources.as_ref().expect("resources");
            assert!(r
                .requests
                .as_ref()
                .is_some_and(|m| m.contains_key("memory")));
            assert!(r.limits.as_ref().is_some_and(|m| m.contains_key("memory")));
        }

        // Sidecar modes the issue asks for.
        let provisioner = container(&pod, "csi-provisioner");
        for f in [
            "--node-deployment=true",
            "--enable-capacity=true",
            "--capacity-ownerref-level=1",
            "--extra-create-metadata=true",
        ] {
            assert!(
                args(provisioner).iter().any(|a| a == f),
                "provisioner lacks {f}"
            );
        }
        let env_names = |c: &Container| -> BTreeSet<String> {
            c.env.iter().flatten().map(|e| e.name.clone()).collect()
        };
        for name in ["NODE_NAME", "NAMESPACE", "POD_NAME"] {
            assert!(
                env_names(provisioner).contains(name),
                "provisioner env {name}"
            );
        }
        assert_eq!(
            provisioner
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "NODE_NAME")
                .and_then(|e| e.value_from.clone())
                .and_then(|v| v.field_ref)
                .map(|f| f.field_path),
            Some("spec.nodeName".to_owned())
        );
        // Every $(VAR) in args is defined in that container's env.
        for c in &pod.containers {
            for a in args(c) {
                if let Some(rest) = a.split("$(").nth(1) {
                    let var = rest.split(')').next().unwrap();
                    assert!(env_names(c).contains(var), "{}: $({var}) undefined", c.name);
                }
            }
        }
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("kennel-node"),
            "node service account"
        );
    }
}

#[test]
fn probes_point_at_served_ports() {
    let Some(overlays) = overlays() else { return };
    for (overlay, docs) in overlays {
        let ds: DaemonSet = find(&docs, "DaemonSet", "kennel-node");
        let dep: Deployment = find(&docs, "Deployment", "kennel-retention");
        let pods = [pod(&ds), dep.spec.unwrap().template.spec.unwrap()];
        for pod in &pods {
            let servers: BTreeMap<i32, &Container> = pod
                .containers
                .iter()
                .flat_map(|c| served_ports(c).into_iter().map(move |p| (p, c)))
                .collect();
            let mut probes = 0;
            for c in &pod.containers {
                // Every declared port is served by some container of the pod.
                for p in c.ports.iter().flatten() {
                    assert!(
                        servers.contains_key(&p.container_port),
                        "{overlay}: {} declares port {} nobody serves",
                        c.name,
                        p.container_port
                    );
                }
                for probe in [&c.liveness_probe, &c.readiness_probe]
                    .into_iter()
                    .flatten()
                {
                    let get = probe.http_get.as_ref().expect("HTTP probes only");
                    let port = port_number(c, &get.port);
                    let server = servers.get(&port).unwrap_or_else(|| {
                        panic!("{overlay}: {} probes port {port} nobody serves", c.name)
                    });
                    let path = get.path.as_deref().unwrap_or("/");
                    let ok: &[&str] = if server
                        .image
                        .as_deref()
                        .is_some_and(|i| i.contains("/kennel:"))
                    {
                        &["/healthz", "/readyz", "/metrics"]
                    } else {
                        &["/healthz"]
                    };
                    assert!(
                        ok.contains(&path),
                        "{overlay}: {} probes {path} on {}",
                        c.name,
                        server.name
                    );
                    probes += 1;
                }
            }
            assert!(
                probes >= 2,
                "{overlay}: a pod without liveness and readiness probes"
            );
        }
        // The driver has both probes; its readiness asks its own /readyz.
        let node = pod(&ds);
        let kennel = container(&node, "kennel");
        assert!(kennel.liveness_probe.is_some());
        let ready = kennel
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(Some(port_number(kennel, &ready.port)), served_port(kennel));
    }
}

#[test]
fn images_are_pinned_to_exact_versions() {
    let semver = |tag: &str| {
        let t = tag.strip_prefix('v').unwrap_or(tag);
        let parts: Vec<&str> = t.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut images = BTreeSet::new();
    let Some(overlays) = overlays() else { return };
    for (_, docs) in overlays {
        let ds: DaemonSet = find(&docs, "DaemonSet", "kennel-node");
        let dep: Deployment = find(&docs, "Deployment", "kennel-retention");
        for pod in [pod(&ds), dep.spec.unwrap().template.spec.unwrap()] {
            for c in pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
            {
                images.insert(c.image.clone().expect("image"));
            }
        }
    }
    let examples = documents(&deploy_dir().join("examples/webserver-statefulset.yaml"));
    assert!(!examples.is_empty());
    for image in &images {
        let (repo, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{image}: no tag"));
        assert!(!repo.is_empty() && !repo.contains('@'), "{image}");
        assert!(
            tag != "latest" && semver(tag),
            "{image}: tag is not an exact version"
        );
        // A short name is resolved by each runtime its own way (containerd: docker.io/library).
        let registry = repo.split('/').next().unwrap();
        assert!(
            repo.contains('/') && (registry.contains('.') || registry == "localhost"),
            "{image}: name the registry"
        );
        if repo.ends_with("/kennel") {
            assert_eq!(
                tag,
                env!("CARGO_PKG_VERSION"),
                "kennel image follows Cargo.toml"
            );
        }
    }
    for sidecar in [
        "csi-provisioner",
        "csi-resizer",
        "csi-snapshotter",
        "csi-node-driver-registrar",
        "livenessprobe",
    ] {
        let prefix = format!("registry.k8s.io/sig-storage/{sidecar}:");
        assert!(
            images.iter().any(|i| i.starts_with(&prefix)),
            "{sidecar} missing"
        );
    }
}

/// Every container image in `docs` (DaemonSets, Deployments).
fn images_in(docs: &[Value]) -> BTreeSet<String> {
    let mut images = BTreeSet::new();
    for doc in docs {
        let pod = doc.pointer("/spec/template/spec");
        for list in ["containers", "initContainers"] {
            for c in pod
                .and_then(|p| p.get(list))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                images.insert(c["image"].as_str().expect("image").to_owned());
            }
        }
    }
    images
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

#[test]
fn an_images_override_moves_every_kennel_container_to_a_registry() {
    // What deploy/kustomization.yaml documents for a user's registry.
    let overlay = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("registry-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&overlay).unwrap();
    let deploy = std::fs::canonicalize(deploy_dir()).unwrap();
    let base = std::fs::canonicalize(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\nimages:\n  - name: localhost/kennel\n    newName: registry.example.com/storage/kennel\n    newTag: 0.1.0\n",
            relative(&deploy, &base).display()
        ),
    )
    .unwrap();
    let rendered = render(&overlay);
    std::fs::remove_dir_all(&overlay).unwrap();
    let Some(docs) = rendered else { return };
    let Some(shipped) = render(&deploy_dir()) else {
        return;
    };
    let kennel_images = |docs: &[Value]| -> Vec<String> {
        images_in(docs)
            .into_iter()
            .filter(|i| i.contains("/kennel:"))
            .collect()
    };
    assert_eq!(kennel_images(&shipped), ["localhost/kennel:0.1.0"]);
    assert_eq!(
        kennel_images(&docs),
        ["registry.example.com/storage/kennel:0.1.0"]
    );
    // The sidecars stay as shipped.
    let sidecars = |docs: &[Value]| -> BTreeSet<String> {
        images_in(docs)
            .into_iter()
            .filter(|i| !i.contains("/kennel:"))
            .collect()
    };
    assert_eq!(sidecars(&docs), sidecars(&shipped));
}

#[test]
fn storage_classes_match_the_driver() {
    let expect = [
        ("loop", vec!["kennel-loop"]),
        ("lvm", vec!["kennel-lvm", "kennel-lvm-thin"]),
    ];
    let lvm_keys = ["type", "thinPool", "deviceClass", "stripes", "stripeSize"];
    let Some(overlays) = overlays() else { return };
    for ((overlay, docs), (_, names)) in overlays.into_iter().zip(expect) {
        let classes: Vec<StorageClass> = all(&docs, "StorageClass");
        let found: Vec<&str> = classes
            .iter()
            .map(|c| c.metadata.name.as_deref().unwrap())
            .collect();
        assert_eq!(found, names, "{overlay}");
        for sc in &classes {
            let name = sc.metadata.name.clone().unwrap();
            assert_eq!(sc.provisioner, DRIVER_NAME);
            assert_eq!(
                sc.volume_binding_mode.as_deref(),
                Some("WaitForFirstConsumer")
            );
            assert_eq!(sc.allow_volume_expansion, Some(true));
            assert_eq!(sc.reclaim_policy.as_deref(), Some("Delete"));
            let mut params = sc.parameters.clone().unwrap_or_default();
            let fs = params.remove("csi.storage.k8s.io/fstype");
            assert!(
                matches!(fs.as_deref(), Some("ext4" | "xfs")),
                "{name}: fstype"
            );
            assert!(
                params.keys().all(|k| !k.starts_with("csi.storage.k8s.io/")),
                "{name}: only fstype of the CO's keys belongs in a class"
            );
            // The driver's own parser: shared keys parsed, the rest go to the backend.
            let parsed = kennel::model::spec::VolumeParams::parse(&params)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            match overlay {
                "loop" => assert!(
                    parsed.backend.is_empty(),
                    "{name}: the loop backend knows no {:?}",
                    parsed.backend
                ),
                _ => {
                    for k in parsed.backend.keys() {
                        assert!(
                            lvm_keys.contains(&k.as_str()),
                            "{name}: unknown lvm key {k}"
                        );
                    }
                    let kind = parsed.backend.get("type").map(String::as_str);
                    assert_eq!(
                        kind,
                        Some(if name.ends_with("-thin") {
                            "thin"
                        } else {
                            "linear"
                        })
                    );
                    if kind == Some("thin") {
                        assert!(parsed.backend.contains_key("thinPool"), "{name}: thinPool");
                    }
                }
            }
        }
        let driver: CSIDriver = find(&docs, "CSIDriver", DRIVER_NAME);
        let spec = driver.spec;
        assert_eq!(spec.attach_required, Some(false));
        assert_eq!(spec.pod_info_on_mount, Some(true));
        assert_eq!(spec.storage_capacity, Some(true));
        assert_eq!(spec.fs_group_policy.as_deref(), Some("File"));
        // One filesystem per volume: mounts with -o context= instead of a recursive relabel.
        assert_eq!(spec.se_linux_mount, Some(true));
        assert_eq!(
            spec.volume_lifecycle_modes,
            Some(vec!["Persistent".to_owned()])
        );
    }
}

#[test]
fn retention_deployment_runs_one_leader_elected_replica() {
    let Some(docs) = render(&deploy_dir()) else {
        return;
    };
    let dep: Deployment = find(&docs, "Deployment", "kennel-retention");
    let spec = dep.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("kennel-retention")
    );
    let c = &pod.containers[0];
    match parse_kennel_args(c).expect("retention flags parse") {
        Command::Retention(a) => {
            assert!(a.leader_election);
            assert_eq!(a.driver_name, DRIVER_NAME);
            assert!(a.metrics_addr.is_some());
        }
        Command::Driver(_) => panic!("retention Deployment runs the driver"),
    }
    let env: BTreeSet<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(
        env.contains("POD_NAME") && env.contains("POD_NAMESPACE"),
        "Lease identity and namespace"
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, None);
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(pod
        .security_context
        .unwrap()
        .run_as_non_root
        .unwrap_or(false));
    assert_eq!(dep.metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn examples_use_kennel() {
    let docs = documents(&deploy_dir().join("examples/webserver-statefulset.yaml"));
    let svc: Service = find(&docs, "Service", "webserver");
    assert_eq!(
        svc.spec.unwrap().cluster_ip.as_deref(),
        Some("None"),
        "headless"
    );
    let sts: StatefulSet = find(&docs, "StatefulSet", "webserver");
    let spec = sts.spec.unwrap();
    assert_eq!(spec.service_name.as_deref(), Some("webserver"));
    assert_eq!(spec.replicas, Some(3));
    assert!(spec.persistent_volume_claim_retention_policy.is_some());
    let templates = spec.volume_claim_templates.unwrap();
    assert_eq!(templates[0].metadata.name.as_deref(), Some("www"));
    let class = templates[0]
        .spec
        .as_ref()
        .unwrap()
        .storage_class_name
        .clone()
        .unwrap();
    let Some(overlays) = overlays() else { return };
    let defined: BTreeSet<String> = overlays
        .iter()
        .flat_map(|(_, docs)| all::<StorageClass>(docs, "StorageClass"))
        .filter_map(|sc| sc.metadata.name)
        .collect();
    assert!(
        defined.contains(&class),
        "{class} is not one of the overlays' classes"
    );
    let vsc =
        documents(&deploy_dir().join("components/snapshot-controller/volumesnapshotclass.yaml"));
    let vsc: VolumeSnapshotClass = round_trip(&vsc[0], "volumesnapshotclass");
    assert_eq!(vsc.driver, DRIVER_NAME);
}

#[test]
fn snapshot_component_crds_are_the_releases_the_tests_run() {
    // shared/k8s/csi/crd holds external-snapshotter's CRDs of the pinned release.
    let Some(shared) = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("shared/k8s/csi/crd"))
        .find(|d| d.is_dir())
    else {
        skip::cannot_run("shared/k8s/csi/crd is missing");
        return;
    };
    let ours = deploy_dir().join("components/snapshot-controller/crd");
    let mut files = 0;
    for file in std::fs::read_dir(&ours).unwrap() {
        let name = file.unwrap().file_name().into_string().unwrap();
        if name == "kustomization.yaml" {
            continue;
        }
        files += 1;
        assert_eq!(
            std::fs::read(ours.join(&name)).unwrap(),
            std::fs::read(shared.join(&name)).unwrap_or_default(),
            "{name} differs from shared/k8s/csi/crd"
        );
    }
    assert_eq!(files, 3, "the three snapshot.storage.k8s.io CRDs");
}

// ---- RBAC -------------------------------------------------------------------------------

/// (API group, resource, verb, the one object it is limited to by `resourceNames`).
type Grant = (String, String, String, Option<String>);
type Grants = BTreeSet<Grant>;

fn grants(rules: &[PolicyRule]) -> Grants {
    let mut out = Grants::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none());
        let names: Vec<Option<String>> = match &rule.resource_names {
            None => vec![None],
            Some(names) => {
                assert!(!names.is_empty(), "an empty resourceNames limits nothing");
                names.iter().cloned().map(Some).collect()
            }
        };
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "wildcards are never least privilege"
                    );
                    // Kubernetes ignores names for these verbs: such a rule would grant nothing.
                    assert!(
                        rule.resource_names.is_none()
                            || !["create", "list", "watch", "deletecollection"]
                                .contains(&verb.as_str()),
                        "{verb} {group}/{resource} cannot be limited by name"
                    );
                    for name in &names {
                        assert!(
                            out.insert((
                                group.clone(),
                                resource.clone(),
                                verb.clone(),
                                name.clone()
                            )),
                            "duplicate grant {verb} {group}/{resource} {name:?}"
                        );
                    }
                }
            }
        }
    }
    out
}

fn expected(rules: &[(&str, &str, &[&str])]) -> Grants {
    rules
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string(), None))
        })
        .collect()
}

/// `grants` with `verb` on `resource` limited to the object `name`.
fn limited(mut grants: Grants, resource: &str, verb: &str, name: &str) -> Grants {
    let unlimited = grants
        .iter()
        .find(|(_, r, v, n)| r == resource && v == verb && n.is_none())
        .cloned()
        .unwrap_or_else(|| panic!("no {verb} {resource} to limit"));
    grants.remove(&unlimited);
    grants.insert((unlimited.0, unlimited.1, unlimited.2, Some(name.to_owned())));
    grants
}

/// What each node sidecar calls, from its kubernetes-csi deploy/kubernetes rbac file for the
/// pinned release, narrowed to the flags in the DaemonSet (no leader election, so no Leases; no
/// provisioner/snapshotter secrets in the classes, so no Secrets).
const PROVISIONER: &[(&str, &str, &[&str])] = &[
    (
        "",
        "persistentvolumes",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "update"],
    ),
    (
        "storage.k8s.io",
        "storageclasses",
        &["get", "list", "watch"],
    ),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        &["get", "list", "watch", "update"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["get", "list"],
    ),
    ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    (
        "storage.k8s.io",
        "volumeattachments",
        &["get", "list", "watch"],
    ),
    (
        "storage.k8s.io",
        "volumeattributesclasses",
        &["get", "list", "watch"],
    ),
];
/// --enable-capacity with --capacity-ownerref-level=1 in a DaemonSet: in its own namespace.
const PROVISIONER_CAPACITY: &[(&str, &str, &[&str])] = &[
    (
        "storage.k8s.io",
        "csistoragecapacities",
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    ),
    ("", "pods", &["get"]),
    ("apps", "daemonsets", &["get"]),
];
/// csi-resizer's leader election (kubernetes-csi's documented Role for it).
const RESIZER_LEASE: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "watch", "list", "delete", "update", "create"],
)];

const RESIZER: &[(&str, &str, &[&str])] = &[
    ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
    ("", "persistentvolumeclaims", &["get", "list", "watch"]),
    ("", "pods", &["get", "list", "watch"]),
    ("", "persistentvolumeclaims/status", &["patch"]),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    (
        "storage.k8s.io",
        "volumeattributesclasses",
        &["get", "list", "watch"],
    ),
];
const SNAPSHOTTER: &[(&str, &str, &[&str])] = &[
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotclasses",
        &["get", "list", "watch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["get", "list", "watch", "update", "patch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents/status",
        &["update", "patch"],
    ),
    (
        "groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotclasses",
        &["get", "list", "watch"],
    ),
    (
        "groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotcontents",
        &["get", "list", "watch", "update", "patch"],
    ),
    (
        "groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotcontents/status",
        &["update", "patch"],
    ),
];

/// Everything granted to `account` by the bindings in `docs`: (role kind, role name) → grants.
fn granted_to(docs: &[Value], account: &str) -> BTreeMap<(String, String), Grants> {
    let binds = |kind: &str| -> Vec<(String, String, Vec<String>)> {
        docs.iter()
            .filter(|d| kind_of(d).1 == kind)
            .map(|d| {
                let (role_ref, subjects) = if kind == "ClusterRoleBinding" {
                    let b: ClusterRoleBinding = round_trip(d, kind);
                    (b.role_ref, b.subjects)
                } else {
                    let b: RoleBinding = round_trip(d, kind);
                    (b.role_ref, b.subjects)
                };
                let subjects = subjects
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|s| s.kind == "ServiceAccount")
                    .map(|s| format!("{}/{}", s.namespace.unwrap_or_default(), s.name))
                    .collect();
                (role_ref.kind, role_ref.name, subjects)
            })
            .collect()
    };
    let mut out = BTreeMap::new();
    for (kind, name, subjects) in binds("ClusterRoleBinding")
        .into_iter()
        .chain(binds("RoleBinding"))
    {
        if !subjects.iter().any(|s| s == account) {
            continue;
        }
        let rules = if kind == "ClusterRole" {
            find::<ClusterRole>(docs, "ClusterRole", &name)
                .rules
                .unwrap_or_default()
        } else {
            let role: Role = find(docs, "Role", &name);
            assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
            role.rules.unwrap_or_default()
        };
        out.insert((kind, name), grants(&rules));
    }
    out
}

#[test]
fn rbac_node_sidecars_get_exactly_their_documented_needs() {
    let Some(docs) = render(&deploy_dir()) else {
        return;
    };
    let got = granted_to(&docs, &format!("{NAMESPACE}/kennel-node"));
    let want: BTreeMap<(String, String), Grants> = [
        ("ClusterRole", "kennel-provisioner", PROVISIONER),
        ("Role", "kennel-provisioner-capacity", PROVISIONER_CAPACITY),
        ("ClusterRole", "kennel-resizer", RESIZER),
        ("Role", "kennel-resizer-lease", RESIZER_LEASE),
        ("ClusterRole", "kennel-snapshotter", SNAPSHOTTER),
        (
            "ClusterRole",
            "kennel-orphans",
            kennel::retention::rbac::ORPHAN_RULES,
        ),
    ]
    .into_iter()
    .map(|(k, n, rules)| ((k.to_owned(), n.to_owned()), expected(rules)))
    .chain([
        // The driver's reads: its PVs, and what a peer's grant is checked against.
        (
            ("ClusterRole".to_owned(), "kennel-driver".to_owned()),
            expected(kennel::csi::placement::DRIVER_RULES)
                .union(&expected(kennel::peer::cluster::CLUSTER_RULES))
                .cloned()
                .collect(),
        ),
        (
            ("Role".to_owned(), "kennel-peer".to_owned()),
            limited(
                expected(kennel::peer::cluster::NAMESPACE_RULES),
                "secrets",
                "get",
                kennel::peer::pki::CA_SECRET_NAME,
            ),
        ),
    ])
    .collect();
    assert_eq!(got, want);
    // The one Secret the node side may read is the peer CA, by name; it may create one (the
    // first node makes the CA; create cannot be limited by name), and never list, watch,
    // change or delete any. Leases only for the resizers' election and the peer addresses.
    for ((_, name), grants) in &got {
        let secrets: BTreeSet<(&str, Option<&str>)> = grants
            .iter()
            .filter(|(g, r, _, _)| g.is_empty() && r == "secrets")
            .map(|(_, _, v, n)| (v.as_str(), n.as_deref()))
            .collect();
        let allowed = if name == "kennel-peer" {
            BTreeSet::from([("get", Some("kennel-peer-ca")), ("create", None)])
        } else {
            BTreeSet::new()
        };
        assert_eq!(secrets, allowed, "{name}");
        assert!(
            grants.iter().all(|(_, r, v, _)| r != "secrets"
                || ![
                    "list",
                    "watch",
                    "update",
                    "patch",
                    "delete",
                    "deletecollection"
                ]
                .contains(&v.as_str())),
            "{name}"
        );
        assert!(
            name == "kennel-resizer-lease"
                || name == "kennel-peer"
                || grants.iter().all(|(_, r, _, _)| r != "leases"),
            "{name}"
        );
    }
}

#[test]
fn rbac_retention_gets_exactly_what_the_code_calls() {
    use kennel::retention::rbac::{CLUSTER_RULES, NAMESPACE_RULES};
    let Some(docs) = render(&deploy_dir()) else {
        return;
    };
    let got = granted_to(&docs, &format!("{NAMESPACE}/kennel-retention"));
    let want: BTreeMap<(String, String), Grants> = [
        ("ClusterRole", "kennel-retention", CLUSTER_RULES),
        ("Role", "kennel-retention-leader", NAMESPACE_RULES),
    ]
    .into_iter()
    .map(|(k, n, rules)| ((k.to_owned(), n.to_owned()), expected(rules)))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn rbac_every_service_account_is_used_and_bound() {
    let Some(docs) = render(&deploy_dir()) else {
        return;
    };
    let accounts: BTreeSet<String> = all::<ServiceAccount>(&docs, "ServiceAccount")
        .into_iter()
        .map(|sa| {
            format!(
                "{}/{}",
                sa.metadata.namespace.unwrap(),
                sa.metadata.name.unwrap()
            )
        })
        .collect();
    let ds: DaemonSet = find(&docs, "DaemonSet", "kennel-node");
    let dep: Deployment = find(&docs, "Deployment", "kennel-retention");
    let used: BTreeSet<String> = [
        pod(&ds).service_account_name,
        dep.spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .service_account_name,
    ]
    .into_iter()
    .map(|n| format!("{NAMESPACE}/{}", n.unwrap()))
    .collect();
    assert_eq!(accounts, used);
    for account in &accounts {
        assert!(
            !granted_to(&docs, account).is_empty(),
            "{account} has no role"
        );
    }
}
