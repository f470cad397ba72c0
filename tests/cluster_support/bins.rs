//! Finding the Kubernetes binaries. `KENNEL_K8S_DIR` (else the nearest
//! `shared/k8s` beside the repository or one of its parent directories)
//! holds three sets: `bin/` (v1.28 control plane, kubelet and sidecars,
//! pause, csi-sanity; `KENNEL_K8S_BIN` overrides it), `v1.36/` (v1.36
//! control plane, kubelet, kube-proxy, kubectl) and `csi/` (current
//! kubernetes-csi sidecars). Each binary is a plain executable or a `.zst`
//! of one, decompressed into the run's own directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes release a cluster runs, with the sidecars tested beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum K8s {
    /// The oldest tested: built-in PVC retention can still be turned off.
    V1_28,
    /// Current: csi-provisioner v6.3.0, node-driver-registrar v2.17.0, …
    #[default]
    V1_36,
}

/// The components of one release (`kube-*`, kubelet, kube-proxy, kubectl).
const KUBERNETES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

/// The kubernetes-csi sidecars.
const SIDECARS: &[&str] = &[
    "csi-provisioner",
    "csi-resizer",
    "csi-snapshotter",
    "snapshot-controller",
    "csi-node-driver-registrar",
    "livenessprobe",
];

impl K8s {
    /// Every binary a cluster of this release starts, by file name.
    pub fn cluster_binaries(self) -> &'static [&'static str] {
        match self {
            K8s::V1_28 => &[
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubelet",
                "csi-provisioner",
                "csi-node-driver-registrar",
                "pause",
            ],
            K8s::V1_36 => &[
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubelet",
                "kubectl",
                "kube-proxy",
                "csi-provisioner",
                "csi-resizer",
                "csi-snapshotter",
                "snapshot-controller",
                "csi-node-driver-registrar",
                "pause",
            ],
        }
    }

    /// `major.minor`, for messages.
    pub fn version(self) -> &'static str {
        match self {
            K8s::V1_28 => "1.28",
            K8s::V1_36 => "1.36",
        }
    }

    /// The directory `name` of this release is found in.
    fn dir_of(self, name: &str) -> Option<PathBuf> {
        match self {
            K8s::V1_36 if KUBERNETES.contains(&name) => Some(root()?.join("v1.36")),
            K8s::V1_36 if SIDECARS.contains(&name) => Some(root()?.join("csi")),
            _ => bin_dir(),
        }
    }
}

/// `shared/k8s`: `KENNEL_K8S_DIR`, else the nearest one beside the repository.
pub fn root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KENNEL_K8S_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    repo.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/k8s"))
        .find(|dir| dir.is_dir())
}

/// The v1.28 set, pause and csi-sanity.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KENNEL_K8S_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    root().map(|r| r.join("bin")).filter(|d| d.is_dir())
}

/// Why `names` of `k8s` cannot be used, if they cannot.
pub fn missing(k8s: K8s, names: &[&str]) -> Option<String> {
    let mut compressed = false;
    for name in names {
        let Some(dir) = k8s.dir_of(name) else {
            return Some(
                "no Kubernetes binaries: set KENNEL_K8S_DIR or KENNEL_K8S_BIN (see README, \"Running the cluster tests\")"
                    .to_owned(),
            );
        };
        match source(&dir, name) {
            None => {
                return Some(format!(
                    "{name} (or {name}.zst) is missing from {}",
                    dir.display()
                ))
            }
            Some(src) => compressed |= src.extension().is_some_and(|e| e == "zst"),
        }
    }
    if compressed && which("zstd").is_none() {
        return Some("zstd is not installed (hack/setup-cluster.sh installs it)".to_owned());
    }
    None
}

fn source(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.zst"))]
        .into_iter()
        .find(|p| p.is_file())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// Make `names` runnable under `dest`: plain binaries are used in place,
/// compressed ones are decompressed (in parallel). Returns name -> path.
pub fn install(
    k8s: K8s,
    names: &[&str],
    dest: &Path,
) -> std::collections::BTreeMap<String, PathBuf> {
    std::fs::create_dir_all(dest).expect("create bin dir");
    std::thread::scope(|scope| {
        let jobs: Vec<_> = names
            .iter()
            .map(|name| {
                scope.spawn(move || {
                    let dir = k8s.dir_of(name).expect("binaries were checked");
                    let src = source(&dir, name).expect("binaries were checked");
                    if src.extension().is_none_or(|e| e != "zst") {
                        return (name.to_string(), src);
                    }
                    let out = dest.join(name);
                    let status = Command::new("zstd")
                        .args(["-d", "-q", "-f", "-o"])
                        .arg(&out)
                        .arg(&src)
                        .status()
                        .expect("run zstd");
                    assert!(status.success(), "zstd -d {} failed", src.display());
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))
                        .expect("chmod binary");
                    (name.to_string(), out)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("decompress"))
            .collect()
    })
}
