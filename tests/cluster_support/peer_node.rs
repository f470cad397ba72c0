//! The cluster's other nodes. Each lives in a network namespace of its own
//! ([`Netns`]: its own address, reached by the host over a veth pair) and runs
//! its own containerd (root, state, CNI bridge and pod subnet), kubelet (root
//! directory, certificates, cgroup root) and Kennel node plugin (driver,
//! registrar, provisioner, own storage), against the one control plane on the
//! host. Losing such a node stops all of it for real; the harness still tears
//! everything down at the end, also after a failure.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::netns::Netns;
use super::node_plugin::{Backend, NodePlugin, PluginSite};
use super::procs::{run_ok, wait_for, Daemon};
use super::{host, procs, random_pod_subnet, ready_with_driver, Cluster, KubeletSite, DRIVER_NAME};

pub struct PeerNode {
    /// The node's current name (a replacement node in the same namespace gets a new one).
    pub name: String,
    pub netns: Netns,
    pub pod_subnet: String,
    containerd: Option<Daemon>,
    kubelet: Option<Daemon>,
    pub plugin: Option<NodePlugin>,
    /// Plugins of this namespace's lost nodes: their storage stays until teardown.
    retired: Vec<NodePlugin>,
}

impl PeerNode {
    pub fn plugin(&self) -> &NodePlugin {
        self.plugin.as_ref().expect("the node's plugin is running")
    }
}

impl Cluster {
    /// Make the namespaces of `opts.peers` before the control plane starts (the API
    /// server's certificate names the addresses they reach it on).
    pub(super) fn plan_peers(&mut self) {
        let prefix = self.names.netns_prefix();
        let base = rand::random::<u8>() % 200;
        for (i, name) in self.opts.peers.clone().into_iter().enumerate() {
            let netns = Netns::plan(&prefix, &i.to_string(), base + i as u8, &self.root);
            netns.create(name);
            self.peers.push(PeerNode {
                name: name.to_owned(),
                netns,
                pod_subnet: String::new(),
                containerd: None,
                kubelet: None,
                plugin: None,
                retired: Vec::new(),
            });
        }
    }

    pub(super) fn start_peers(&mut self, backend: Backend) {
        for i in 0..self.peers.len() {
            self.start_peer(i, backend);
        }
        for i in 0..self.peers.len() {
            self.wait_peer_ready(i);
        }
    }

    /// The peer node named `name`.
    pub fn peer(&self, name: &str) -> &PeerNode {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this cluster"))
    }

    fn peer_index(&self, name: &str) -> usize {
        self.peers
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this cluster"))
    }

    fn peer_containerd_dir(&self, name: &str) -> PathBuf {
        self.root.join(format!("containerd-{name}"))
    }

    fn peer_cgroup(&self, name: &str) -> String {
        format!("{}-{name}", self.names.cgroup)
    }

    /// The API server as the peers reach it: on the host's end of `netns`'s link.
    fn api_url_from(&self, netns: &Netns) -> String {
        let port = self
            .api_url
            .rsplit(':')
            .next()
            .expect("the API server's URL names a port");
        format!("https://{}:{port}", netns.host_ip)
    }

    /// `ctr` against node `name`'s containerd, in the kubelet's namespace.
    pub fn ctr_on(&self, name: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.peer_containerd_dir(name).join("containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args);
        cmd
    }

    /// Start peer `i`'s containerd, kubelet and node plugin under its current name.
    fn start_peer(&mut self, i: usize, backend: Backend) {
        let name = self.peers[i].name.clone();
        let netns = self.peers[i].netns.clone();
        let dir = self.peer_containerd_dir(&name);
        let subnet = random_pod_subnet();
        let config = self.containerd_config(
            &dir,
            &self.root.join(format!("cni-{name}")),
            &self.names.bridge,
            &subnet,
        );
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let mut containerd =
            Daemon::spawn(&format!("containerd-{name}"), netns.wrap(cmd), &self.logs);
        let socket = dir.join("containerd.sock");
        wait_for(
            &format!("containerd of {name} to listen"),
            30,
            || {
                containerd.assert_running();
                socket.exists().then_some(())
            },
            String::new,
        );
        for archive in self.image_archives.clone() {
            let archive = archive.to_str().expect("utf-8 path").to_owned();
            run_ok(
                self.ctr_on(&name, &["images", "import", "--no-unpack", &archive]),
                120,
            );
        }
        host::create_cgroup_root(&self.peer_cgroup(&name));
        let mut kubelet = self.spawn_peer_kubelet(i);
        // The kubelet makes its root a shared mount as it starts; the driver refuses to run
        // on a directory that is not one.
        let root = self.kubelet_dir_of(&name);
        wait_for(
            &format!("the kubelet of {name} to mount its root shared"),
            60,
            || {
                kubelet.assert_running();
                host::mounts_under(&root).contains(&root).then_some(())
            },
            || procs::tail(&self.logs.join(format!("kubelet-{name}.log")), 30),
        );
        let plugin = self.spawn_peer_plugin(i, backend);
        let peer = &mut self.peers[i];
        peer.pod_subnet = subnet;
        peer.containerd = Some(containerd);
        peer.kubelet = Some(kubelet);
        peer.plugin = Some(plugin);
    }

    fn spawn_peer_kubelet(&self, i: usize) -> Daemon {
        let peer = &self.peers[i];
        let site = KubeletSite {
            name: peer.name.clone(),
            ip: peer.netns.node_ip.clone(),
            api_url: self.api_url_from(&peer.netns),
            cgroup: self.peer_cgroup(&peer.name),
            containerd_socket: self.peer_containerd_dir(&peer.name).join("containerd.sock"),
        };
        Daemon::spawn(
            &format!("kubelet-{}", peer.name),
            peer.netns.wrap(self.kubelet_command(&site)),
            &self.logs,
        )
    }

    fn spawn_peer_plugin(&self, i: usize, backend: Backend) -> NodePlugin {
        let peer = &self.peers[i];
        let kubeconfig = self.service_account_kubeconfig_at(
            "kennel-node",
            &self.api_url_from(&peer.netns),
            &format!("kennel-node-{}", peer.name),
        );
        let site = PluginSite {
            node: peer.name.clone(),
            kubelet_dir: self.kubelet_dir_of(&peer.name),
            netns: Some(peer.netns.clone()),
        };
        NodePlugin::start_at(self, &site, backend, &kubeconfig)
    }

    /// Kill node `name`'s kubelet only (its pods and plugin keep running, as when the
    /// kubelet crashes).
    pub fn kill_peer_kubelet(&mut self, name: &str) {
        let i = self.peer_index(name);
        if let Some(mut kubelet) = self.peers[i].kubelet.take() {
            kubelet.kill();
        }
    }

    /// Start node `name`'s kubelet again and wait for the node to be Ready.
    pub fn restart_peer_kubelet(&mut self, name: &str) {
        let i = self.peer_index(name);
        assert!(self.peers[i].kubelet.is_none(), "kubelet of {name} runs");
        let kubelet = self.spawn_peer_kubelet(i);
        self.peers[i].kubelet = Some(kubelet);
        self.wait_peer_ready(i);
    }

    /// Stop node `name`'s plugin (the driver deregisters) and start it again on the same
    /// storage (loop images are kept by node name), waiting until the driver is registered.
    pub fn restart_peer_plugin(&mut self, name: &str) {
        let i = self.peer_index(name);
        self.replace_peer_plugin(i, NodePlugin::stop);
    }

    /// Node `i`'s plugin ended by `end` and started again on the same storage.
    fn replace_peer_plugin(&mut self, i: usize, end: fn(&mut NodePlugin)) {
        let mut old = self.peers[i].plugin.take().expect("plugin running");
        assert_eq!(
            old.backend,
            Backend::Loop,
            "only the loop backend keeps its storage across a plugin restart"
        );
        end(&mut old);
        let backend = old.backend;
        drop(old);
        let plugin = self.spawn_peer_plugin(i, backend);
        self.peers[i].plugin = Some(plugin);
        self.wait_peer_ready(i);
    }

    /// SIGKILL node `name`'s plugin (driver and sidecars, as a crash would) and start it
    /// again on the same storage, waiting until the driver is registered. Either node.
    pub fn crash_plugin(&mut self, name: &str) {
        if name == self.node_name {
            let mut old = self.plugin.take().expect("plugin running");
            old.kill();
            let backend = old.backend;
            drop(old);
            self.start_plugin(backend);
            self.wait_node_ready();
            return;
        }
        let i = self.peer_index(name);
        self.replace_peer_plugin(i, NodePlugin::kill);
    }

    /// Node Ready and Kennel's driver in its CSINode.
    fn wait_peer_ready(&mut self, i: usize) {
        let name = self.peers[i].name.clone();
        let kubectl = self.kubectl.clone();
        let log = self.logs.join(format!("kubelet-{name}.log"));
        let peer = &mut self.peers[i];
        wait_for(
            &format!("node {name} Ready with {DRIVER_NAME} in its CSINode"),
            120,
            || {
                for d in [peer.kubelet.as_mut(), peer.containerd.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    d.assert_running();
                }
                if let Some(p) = peer.plugin.as_mut() {
                    p.assert_running();
                }
                ready_with_driver(&kubectl, &name)
            },
            || procs::tail(&log, 30),
        );
    }

    /// Node `name` dies for real: its kubelet, its pods' containers, Kennel's plugin and its
    /// containerd (with the shims) stop, without a word to the API server. Its storage stays
    /// on the host. The Node object goes NotReady after the node-monitor grace period.
    pub fn lose_peer(&mut self, name: &str) {
        let i = self.peer_index(name);
        let cgroup = self.peer_cgroup(name);
        let containerd_dir = self.peer_containerd_dir(name);
        let peer = &mut self.peers[i];
        if let Some(mut kubelet) = peer.kubelet.take() {
            kubelet.kill();
        }
        host::kill_cgroup(&cgroup);
        if let Some(mut plugin) = peer.plugin.take() {
            plugin.kill();
            peer.retired.push(plugin);
        }
        if let Some(mut containerd) = peer.containerd.take() {
            containerd.kill();
        }
        host::kill_processes_naming(&containerd_dir);
    }

    /// A new node `name` in lost peer `old`'s namespace: fresh containerd, kubelet root,
    /// cgroup root and storage.
    pub fn replace_peer(&mut self, old: &str, name: &str, backend: Backend) {
        let i = self.peer_index(old);
        assert!(
            self.peers[i].kubelet.is_none(),
            "node {old} must be lost before it is replaced"
        );
        self.peers[i].name = name.to_owned();
        self.start_peer(i, backend);
        self.wait_peer_ready(i);
    }

    /// Stop every peer's daemons; returns their plugins (storage), to drop after the host's
    /// teardown.
    pub(super) fn stop_peers(&mut self) -> Vec<NodePlugin> {
        let mut plugins = Vec::new();
        for peer in self.peers.iter_mut() {
            if let Some(mut kubelet) = peer.kubelet.take() {
                kubelet.stop(Duration::from_secs(10));
            }
            if let Some(mut plugin) = peer.plugin.take() {
                plugin.stop();
                plugins.push(plugin);
            }
            plugins.append(&mut peer.retired);
            peer.containerd.take();
        }
        plugins
    }
}
