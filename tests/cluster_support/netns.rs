//! A second machine on this host: a network namespace joined to the host by
//! a veth pair, with its own address, and a UTS namespace with its own
//! hostname (leader elections tell their candidates apart by it). Mounts are
//! not separate: its processes share the host's mount namespace, so a node in
//! it sees the same files (and its mounts are the host's), which is what the
//! tests need to look at both nodes' storage.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::procs::{run, run_ok};

/// One namespace and its link to the host.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
    /// The veth end left on the host: taking it down cuts the node off.
    pub host_link: String,
    /// The host's address on the link (how the node reaches the API server).
    pub host_ip: String,
    /// The node's address.
    pub node_ip: String,
    /// The UTS namespace, bound to a file (under the run's directory).
    pub uts: PathBuf,
}

impl Netns {
    /// The namespace `prefix` + `suffix`, on the /30 `10.<octet>.<third>.0`, its UTS
    /// namespace bound under `dir`.
    pub fn plan(prefix: &str, suffix: &str, third: u8, dir: &Path) -> Netns {
        let octet = 190 + rand::random::<u8>() % 9;
        Netns {
            name: format!("{prefix}{suffix}"),
            host_link: format!("{prefix}{suffix}h"),
            host_ip: format!("10.{octet}.{third}.1"),
            node_ip: format!("10.{octet}.{third}.2"),
            uts: dir.join(format!("uts-{prefix}{suffix}")),
        }
    }

    /// Make the namespaces (hostname `hostname`), the loopback and the veth pair, addressed.
    pub fn create(&self, hostname: &str) {
        std::fs::write(&self.uts, b"").expect("create the UTS namespace's file");
        let mut uts = Command::new("unshare");
        uts.arg(format!("--uts={}", self.uts.display()))
            .args(["hostname", hostname]);
        run_ok(uts, 30);
        let node_link = format!("{}n", &self.name);
        let ip = |args: &[&str]| {
            let mut cmd = Command::new("ip");
            cmd.args(args);
            run_ok(cmd, 30);
        };
        ip(&["netns", "add", &self.name]);
        ip(&["-n", &self.name, "link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            &self.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &node_link,
            "netns",
            &self.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            &self.host_link,
        ]);
        ip(&["link", "set", &self.host_link, "up"]);
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{}/30", self.node_ip),
            "dev",
            &node_link,
        ]);
        ip(&["-n", &self.name, "link", "set", &node_link, "up"]);
        ip(&[
            "-n",
            &self.name,
            "route",
            "add",
            "default",
            "via",
            &self.host_ip,
        ]);
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `cmd` run inside the namespace's network (mounts stay the host's).
    pub fn wrap(&self, cmd: Command) -> Command {
        let mut wrapped = Command::new("nsenter");
        wrapped
            .arg(format!("--net={}", self.path().display()))
            .arg(format!("--uts={}", self.uts.display()))
            .arg("--")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Cut the node off the network (as a pulled cable would) or restore it.
    pub fn set_link(&self, up: bool) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "link",
            "set",
            &self.host_link,
            if up { "up" } else { "down" },
        ]);
        run_ok(cmd, 30);
    }
}

/// Delete every namespace whose name starts with `prefix` (its veth pair goes
/// with it). Returns the ones that could not be deleted.
pub fn remove_all(prefix: &str) -> Vec<String> {
    let mut left = Vec::new();
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return left;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "delete", &name]);
        if !run(cmd, 30).status.success() {
            left.push(format!("network namespace {name}"));
        }
    }
    left
}
