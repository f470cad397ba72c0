//! Finding the Kubernetes binaries: `KENNEL_K8S_BIN`, else the nearest
//! `shared/k8s/bin` beside the repository or one of its parent directories.
//! Each is a plain executable or a `.zst` of one, decompressed into the
//! run's own directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every binary the cluster tests start, by file name.
pub const CLUSTER_BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "csi-provisioner",
    "csi-node-driver-registrar",
    "pause",
];

/// The directory holding the binaries, if there is one.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KENNEL_K8S_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    repo.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/k8s/bin"))
        .find(|dir| dir.is_dir())
}

/// Why the binaries cannot be used, if they cannot.
pub fn missing(names: &[&str]) -> Option<String> {
    let Some(dir) = bin_dir() else {
        return Some(
            "no Kubernetes binaries: set KENNEL_K8S_BIN (see README, \"Running the cluster tests\")"
                .to_owned(),
        );
    };
    for name in names {
        if source(&dir, name).is_none() {
            return Some(format!(
                "{name} (or {name}.zst) is missing from {}",
                dir.display()
            ));
        }
    }
    if names.iter().any(|n| !dir.join(n).exists()) && which("zstd").is_none() {
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
pub fn install(names: &[&str], dest: &Path) -> std::collections::BTreeMap<String, PathBuf> {
    let dir = bin_dir().expect("binaries were checked");
    std::fs::create_dir_all(dest).expect("create bin dir");
    std::thread::scope(|scope| {
        let jobs: Vec<_> = names
            .iter()
            .map(|name| {
                let dir = &dir;
                scope.spawn(move || {
                    let src = source(dir, name).expect("binaries were checked");
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
