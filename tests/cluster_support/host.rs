//! Host state a cluster run touches, found and removed by its directory:
//! processes, mounts, loop devices, cgroups, the CNI bridge, pod log
//! directories, and the sysctls the kubelet changes. The same teardown runs
//! on drop and, for runs that were killed, at the start of the next run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::procs::run;

/// Prefix of every run's directory (in the system temp dir), cgroup and
/// namespace-free name.
pub const RUN_PREFIX: &str = "kennel-cluster-";

/// The sysctls kubelet 1.28 sets on start (pkg/kubelet/cm: setupKernelTunables).
pub const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Record the current values of the kubelet's sysctls in `file`.
pub fn save_sysctls(file: &Path) {
    let text: String = KUBELET_SYSCTLS
        .iter()
        .filter_map(|k| {
            std::fs::read_to_string(Path::new("/proc/sys").join(k))
                .ok()
                .map(|v| format!("{k}={}\n", v.trim()))
        })
        .collect();
    std::fs::write(file, text).expect("save sysctls");
}

/// Write back what `save_sysctls` recorded.
pub fn restore_sysctls(file: &Path) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    for line in text.lines() {
        if let Some((key, value)) = line.split_once('=') {
            if KUBELET_SYSCTLS.contains(&key) {
                let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
            }
        }
    }
}

/// Mount points at or under `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(root))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

pub fn unescape(field: &str) -> String {
    let mut out = Vec::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One attached loop device.
#[derive(Debug, Clone)]
pub struct LoopDev {
    pub name: String,
    pub back_file: String,
    pub offset: u64,
}

pub fn loop_devices() -> Vec<LoopDev> {
    let mut cmd = Command::new("losetup");
    cmd.args(["--list", "--json", "--output", "NAME,BACK-FILE,OFFSET"]);
    let out = run(cmd, 30);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc["loopdevices"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|d| LoopDev {
            name: d["name"].as_str().unwrap_or_default().to_owned(),
            back_file: d["back-file"]
                .as_str()
                .unwrap_or_default()
                .trim_end_matches(" (deleted)")
                .to_owned(),
            offset: match &d["offset"] {
                serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
                serde_json::Value::String(s) => s.parse().unwrap_or(0),
                _ => 0,
            },
        })
        .collect()
}

/// Processes whose command line or working directory names `root`.
fn processes_of(root: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| pid != me)
                .filter(|pid| {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    String::from_utf8_lossy(&cmdline).contains(&needle)
                        || std::fs::read_link(format!("/proc/{pid}/cwd"))
                            .is_ok_and(|cwd| cwd.starts_with(root))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL every process whose command line or working directory names `path`.
pub fn kill_processes_naming(path: &Path) {
    for _ in 0..20 {
        let pids = processes_of(path);
        if pids.is_empty() {
            return;
        }
        kill_all(&pids);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cgroup directories whose name starts with `prefix` (a run's, and its other nodes'), in
/// every hierarchy.
fn run_cgroup_dirs(prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .filter_map(|h| std::fs::read_dir(h.path()).ok())
                .flat_map(|entries| entries.flatten())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Cgroup directories named `name` under each v1 hierarchy and the v2 one.
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join(name))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Make the run's cgroup root in every hierarchy (the kubelet's
/// `cgroupRoot` must exist), with cpusets copied from the parent.
pub fn create_cgroup_root(name: &str) {
    for entry in std::fs::read_dir("/sys/fs/cgroup")
        .expect("read /sys/fs/cgroup")
        .flatten()
    {
        let hierarchy = entry.path();
        if hierarchy.file_name().is_some_and(|n| n == "unified")
            || !hierarchy.join("cgroup.procs").exists()
        {
            continue;
        }
        let dir = hierarchy.join(name);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                let _ = std::fs::write(dir.join(file), value.trim());
            }
        }
    }
}

fn pids_in_cgroup_tree(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in walkdir(dir) {
        if let Ok(text) = std::fs::read_to_string(entry.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids
}

/// Directories of a tree, parents before children.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// SIGKILL every process in the run's cgroup tree (the pods' containers).
pub fn kill_containers(names: &RunNames) {
    kill_cgroup(&names.cgroup);
}

/// SIGKILL every process in the cgroup tree `name` of every hierarchy.
pub fn kill_cgroup(name: &str) {
    for _ in 0..20 {
        let pids: Vec<i32> = cgroup_dirs(name)
            .iter()
            .flat_map(|d| pids_in_cgroup_tree(d))
            .collect();
        if pids.is_empty() {
            return;
        }
        kill_all(&pids);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill_all(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Names of a run's host objects that do not live in its directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunNames {
    /// The run's id: its directory is `RUN_PREFIX` + id.
    pub id: String,
    pub cgroup: String,
    pub bridge: String,
}

impl RunNames {
    pub fn new(id: &str) -> RunNames {
        RunNames {
            id: id.to_owned(),
            cgroup: format!("{RUN_PREFIX}{id}"),
            bridge: format!("knl{}", &id[..id.len().min(8)]),
        }
    }

    /// The prefix of the run's network namespaces (the other nodes), short enough for link
    /// names made from it.
    pub fn netns_prefix(&self) -> String {
        format!("kn{}", &self.id[..self.id.len().min(8)])
    }

    /// The prefix of the run's Kubernetes namespaces (and so of its pod
    /// log directories under /var/log/pods).
    pub fn namespace_prefix(&self) -> String {
        format!("kc{}-", &self.id[..self.id.len().min(8)])
    }
}

/// Remove everything the run in `root` left on the host, then `root`.
/// Returns what could not be removed.
pub fn teardown(root: &Path, names: &RunNames) -> Vec<String> {
    let mut problems = Vec::new();
    // Containers first (their cgroups), then the shims and daemons that
    // name the directory, until nothing is left.
    for _ in 0..50 {
        let mut pids: Vec<i32> = run_cgroup_dirs(&names.cgroup)
            .iter()
            .flat_map(|d| pids_in_cgroup_tree(d))
            .collect();
        pids.extend(processes_of(root));
        if pids.is_empty() {
            break;
        }
        kill_all(&pids);
        std::thread::sleep(Duration::from_millis(100));
    }
    for mount in mounts_under(root) {
        if nix::mount::umount(&mount).is_err() {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let left = mounts_under(root);
    if !left.is_empty() {
        problems.push(format!("mounts left: {left:?}"));
    }
    let root_str = root.to_string_lossy().into_owned();
    for dev in loop_devices() {
        if dev.back_file.starts_with(&root_str) {
            let mut cmd = Command::new("losetup");
            cmd.args(["-d", &dev.name]);
            if !run(cmd, 30).status.success() {
                problems.push(format!("loop device {} over {}", dev.name, dev.back_file));
            }
        }
    }
    // The other nodes' namespaces (and their links) once nothing runs in them.
    problems.extend(super::netns::remove_all(&names.netns_prefix()));
    for dir in run_cgroup_dirs(&names.cgroup) {
        for sub in walkdir(&dir).into_iter().rev() {
            for _ in 0..20 {
                if std::fs::remove_dir(&sub).is_ok() || !sub.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if dir.exists() {
            problems.push(format!("cgroup {}", dir.display()));
        }
    }
    if Path::new("/sys/class/net").join(&names.bridge).exists() {
        let mut cmd = Command::new("ip");
        cmd.args(["link", "delete", &names.bridge]);
        if !run(cmd, 30).status.success() {
            problems.push(format!("bridge {}", names.bridge));
        }
    }
    remove_pod_logs(&names.namespace_prefix());
    remove_cni_results(|run| run == names.id);
    restore_sysctls(&root.join("sysctls.saved"));
    if let Err(e) = std::fs::remove_dir_all(root) {
        if root.exists() {
            problems.push(format!("remove {}: {e}", root.display()));
        }
    }
    problems
}

/// The kubelet 1.28 keeps pod logs in /var/log/pods/NAMESPACE_POD_UID and
/// links them from /var/log/containers: remove the run's.
pub fn remove_pod_logs(namespace_prefix: &str) {
    if let Ok(dir) = std::fs::read_dir("/var/log/pods") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(namespace_prefix)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/var/log/containers") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .contains(&format!("_{namespace_prefix}"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// containerd caches each sandbox's CNI results in /var/lib/cni/results
/// (`<network>-<sandbox>-eth0`, `cni-loopback-<sandbox>-lo`); a sandbox
/// killed with its node is never torn down through CNI, so remove the
/// results of the runs `dead` names (the network is `kennel-<run id>`).
fn remove_cni_results(dead: impl Fn(&str) -> bool) {
    let dir = Path::new("/var/lib/cni/results");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("kennel-") else {
            continue;
        };
        let mut parts = rest.splitn(2, '-');
        let (Some(run), Some(sandbox)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !dead(run) {
            continue;
        }
        let sandbox = sandbox.trim_end_matches("-eth0");
        let _ = std::fs::remove_file(dir.join(format!("cni-loopback-{sandbox}-lo")));
        let _ = std::fs::remove_file(e.path());
    }
}

/// Tear down runs whose test process is gone (killed before its cleanup).
pub fn sweep_stale_runs() {
    remove_cni_results(|run| {
        !std::env::temp_dir()
            .join(format!("{RUN_PREFIX}{run}"))
            .exists()
    });
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix(RUN_PREFIX) else {
            continue;
        };
        // A run's id is 16 hex digits; `kennel-cluster-logs-<id>` holds a failed run's logs,
        // kept for a person, not a run to tear down.
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let root = e.path();
        let owner: Option<i32> = std::fs::read_to_string(root.join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        let names = std::fs::read(root.join("names.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| RunNames::new(id));
        let problems = teardown(&root, &names);
        eprintln!(
            "cluster: removed stale run {}{}",
            root.display(),
            if problems.is_empty() {
                String::new()
            } else {
                format!(" (left: {problems:?})")
            }
        );
    }
}
