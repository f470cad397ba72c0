//! Kennel's node plugin as `deploy/base/node-daemonset.yaml` runs it, as
//! host processes: `kennel driver` on a socket in the kubelet's plugin dir,
//! the node-driver-registrar announcing it to the kubelet, and
//! csi-provisioner in node-deployment mode with capacity tracking.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::netns::Netns;
use super::procs::{free_port, wait_for, Daemon};
use super::vg::TestVg;
use super::{Cluster, DRIVER_NAME};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Loop,
    Lvm,
}

impl Backend {
    /// The StorageClass of this backend in `deploy/overlays/`.
    pub fn storage_class(self) -> &'static str {
        match self {
            Backend::Loop => "kennel-loop",
            Backend::Lvm => "kennel-lvm",
        }
    }
}

/// Size of the pool each backend gets.
pub const POOL_BYTES: u64 = 2 << 30;

/// Where a driver keeps its volumes.
pub enum Storage {
    Loop { dir: PathBuf },
    Lvm { vg: TestVg, lock_dir: PathBuf },
}

impl Storage {
    pub fn create(backend: Backend, root: &Path, node: &str) -> Storage {
        match backend {
            Backend::Loop => {
                let dir = root.join(format!("loop-{node}"));
                std::fs::create_dir_all(&dir).expect("create loop dir");
                Storage::Loop { dir }
            }
            Backend::Lvm => {
                let lock_dir = root.join("lvm-locks");
                std::fs::create_dir_all(&lock_dir).expect("create lock dir");
                Storage::Lvm {
                    vg: TestVg::with_capacity(POOL_BYTES),
                    lock_dir,
                }
            }
        }
    }

    /// The driver's backend flags.
    pub fn driver_args(&self, cmd: &mut Command) {
        match self {
            Storage::Loop { dir } => {
                cmd.arg("--backend=loop")
                    .arg(format!("--loop-dir={}", dir.display()))
                    .arg(format!("--capacity={POOL_BYTES}"))
                    .arg("--reserve=0")
                    .arg("--provisioning=sparse");
            }
            Storage::Lvm { vg, lock_dir } => {
                cmd.arg("--backend=lvm")
                    .arg(format!("--volume-group={}", vg.name))
                    .arg(format!("--lock-dir={}", lock_dir.display()));
            }
        }
    }

    /// Whether volume `id` has storage on the host (image file or LV).
    pub fn stored(&self, id: &str) -> bool {
        match self {
            Storage::Loop { dir } => dir.join(format!("{id}.img")).exists(),
            Storage::Lvm { vg, .. } => vg.lv(id).is_some(),
        }
    }

    /// The volumes (and snapshots) the host holds: image file names, or LV names.
    pub fn stored_names(&self) -> std::collections::BTreeSet<String> {
        match self {
            Storage::Loop { dir } => std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|name| name.ends_with(".img"))
                        .collect()
                })
                .unwrap_or_default(),
            Storage::Lvm { vg, .. } => vg.lvs().into_iter().map(|lv| lv.name).collect(),
        }
    }

    /// Loop devices exposing volume `id`.
    pub fn attachments(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Storage::Loop { dir } => {
                let image = dir.join(format!("{id}.img")).to_string_lossy().into_owned();
                super::host::loop_devices()
                    .into_iter()
                    .filter(|d| d.back_file == image)
                    .map(|d| PathBuf::from(d.name))
                    .collect()
            }
            Storage::Lvm { vg, .. } => vg.windows_of_lv(id),
        }
    }
}

/// `kennel driver` started the way the tests start it, with the driver's
/// log at `log`. `kubelet_dir` is where the CO stages and publishes.
pub fn driver_command(
    endpoint: &str,
    node_id: &str,
    storage: &Storage,
    kubelet_dir: &Path,
    metrics_addr: Option<&str>,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kennel"));
    cmd.arg("driver")
        .arg(format!("--endpoint={endpoint}"))
        .arg(format!("--node-id={node_id}"))
        .arg(format!("--driver-name={DRIVER_NAME}"));
    // Staging and publish paths must lie below it, and it must be a shared mount
    // (the kubelet bind-mounts its root onto itself rshared).
    cmd.arg("--kubelet-dir").arg(kubelet_dir);
    storage.driver_args(&mut cmd);
    if let Some(addr) = metrics_addr {
        cmd.arg(format!("--metrics-addr={addr}"));
    }
    cmd.env("RUST_LOG", "kennel=debug,info")
        .env("NO_COLOR", "1");
    cmd
}

/// The node a plugin serves: its name, its kubelet's root, and its network namespace
/// (`None`: the host's).
/// Where a node in a namespace of its own serves the peer channel.
const PEER_PORT: u16 = 9650;

pub struct PluginSite {
    pub node: String,
    pub kubelet_dir: PathBuf,
    pub netns: Option<Netns>,
}

pub struct NodePlugin {
    pub backend: Backend,
    pub storage: Storage,
    pub node_name: String,
    /// The driver's metrics endpoint: the node's loopback, or its address in a namespace.
    pub metrics_host: String,
    pub metrics_port: u16,
    pub socket: PathBuf,
    driver: Daemon,
    registrar: Daemon,
    provisioner: Daemon,
    resizer: Option<Daemon>,
    snapshotter: Option<Daemon>,
    /// The driver's `KENNEL_PAUSE_DIR`.
    pub pause_dir: PathBuf,
}

impl NodePlugin {
    pub fn start(cluster: &Cluster, backend: Backend, kubeconfig: &Path) -> NodePlugin {
        let site = PluginSite {
            node: cluster.node_name.clone(),
            kubelet_dir: cluster.kubelet_root(),
            netns: None,
        };
        NodePlugin::start_at(cluster, &site, backend, kubeconfig)
    }

    /// The plugin of `site`'s node; its processes live in the node's network namespace and
    /// log as `<component>-<node>` when the node has one.
    pub fn start_at(
        cluster: &Cluster,
        site: &PluginSite,
        backend: Backend,
        kubeconfig: &Path,
    ) -> NodePlugin {
        let kubelet = &site.kubelet_dir;
        let plugin_dir = kubelet.join("plugins").join(DRIVER_NAME);
        let registry = kubelet.join("plugins_registry");
        std::fs::create_dir_all(&plugin_dir).expect("create plugin dir");
        std::fs::create_dir_all(&registry).expect("create registry dir");
        let socket = plugin_dir.join("csi.sock");
        let endpoint = format!("unix://{}", socket.display());
        let node = site.node.clone();
        let storage = Storage::create(backend, &cluster.root, &node);
        let metrics_port = free_port();
        let metrics_host = site
            .netns
            .as_ref()
            .map_or_else(|| "127.0.0.1".to_owned(), |n| n.node_ip.clone());
        let logs = &cluster.logs;
        let place = |cmd: Command| match &site.netns {
            Some(netns) => netns.wrap(cmd),
            None => cmd,
        };
        let label = |component: &str| match &site.netns {
            Some(_) => format!("{component}-{node}"),
            None => component.to_owned(),
        };
        let mut driver_cmd = driver_command(
            &endpoint,
            &node,
            &storage,
            kubelet,
            Some(&format!("{metrics_host}:{metrics_port}")),
        );
        // Reads where other nodes' volumes are, as deploy/'s DaemonSet lets it.
        driver_cmd.arg("--kube-api").env("KUBECONFIG", kubeconfig);
        // With several nodes, each serves its snapshots to the others and restores theirs:
        // a node in a namespace on its own address; the host (node-a) on all of its, reached
        // at its end of the first link.
        if let Some(first) = cluster.peers.first() {
            let (listen, advertise) = match &site.netns {
                Some(netns) => (format!("{}:{PEER_PORT}", netns.node_ip), &netns.node_ip),
                None => (format!("0.0.0.0:{}", free_port()), &first.netns.host_ip),
            };
            driver_cmd
                .arg(format!("--peer-listen={listen}"))
                .arg(format!("--peer-advertise-ip={advertise}"))
                // A cut link is noticed in seconds, not a minute.
                .arg("--peer-stall-timeout=5s");
        }
        // Where a scenario can hold one of the driver's steps (src/faults.rs).
        let pause_dir = cluster.root.join(format!("pause-{node}"));
        std::fs::create_dir_all(&pause_dir).expect("create pause dir");
        driver_cmd.env(kennel::faults::PAUSE_DIR_ENV, &pause_dir);
        let mut driver = Daemon::spawn(&label("kennel-driver"), place(driver_cmd), logs);
        wait_for(
            "the driver's socket",
            30,
            || {
                driver.assert_running();
                socket.exists().then_some(())
            },
            String::new,
        );
        let mut registrar = Command::new(&cluster.bins["csi-node-driver-registrar"]);
        registrar
            .arg(format!("--csi-address={}", socket.display()))
            .arg(format!("--kubelet-registration-path={}", socket.display()))
            .arg(format!("--plugin-registration-path={}", registry.display()))
            .arg("--v=2");
        let registrar = Daemon::spawn(&label("node-driver-registrar"), place(registrar), logs);
        let mut provisioner = Command::new(&cluster.bins["csi-provisioner"]);
        provisioner
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--csi-address={}", socket.display()))
            .args([
                "--node-deployment=true",
                "--strict-topology=true",
                "--immediate-topology=false",
                "--feature-gates=Topology=true",
                "--enable-capacity=true",
                // No pod of a DaemonSet to own the capacity objects here.
                "--capacity-ownerref-level=-1",
                "--extra-create-metadata=true",
                "--timeout=120s",
                "--v=2",
            ])
            .env("NODE_NAME", &node)
            .env("NAMESPACE", "kennel-system")
            .env("POD_NAME", format!("kennel-node-{node}"));
        let provisioner = Daemon::spawn(&label("csi-provisioner"), place(provisioner), logs);
        // One per node, electing a leader, as deploy/'s DaemonSet runs them (csi-resizer has
        // no node-deployment mode). Releases whose test binaries have none run without.
        let resizer = cluster.bins.get("csi-resizer").map(|bin| {
            let mut resizer = Command::new(bin);
            resizer
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--csi-address={}", socket.display()))
                .args([
                    "--leader-election=true",
                    "--leader-election-namespace=kennel-system",
                    "--timeout=300s",
                    "--v=2",
                ]);
            Daemon::spawn(&label("csi-resizer"), place(resizer), logs)
        });
        // Snapshots where the cluster takes them (several nodes): one per node, for the
        // node's own volumes, as deploy/'s DaemonSet runs it.
        let snapshotter = cluster
            .bins
            .get("csi-snapshotter")
            .filter(|_| !cluster.peers.is_empty())
            .map(|bin| {
                let mut snapshotter = Command::new(bin);
                snapshotter
                    .arg(format!("--kubeconfig={}", kubeconfig.display()))
                    .arg(format!("--csi-address={}", socket.display()))
                    .args([
                        "--node-deployment=true",
                        "--leader-election=false",
                        "--extra-create-metadata=true",
                        "--timeout=300s",
                        "--v=2",
                    ])
                    .env("NODE_NAME", &node);
                Daemon::spawn(&label("csi-snapshotter"), place(snapshotter), logs)
            });
        NodePlugin {
            backend,
            storage,
            node_name: node,
            metrics_host,
            metrics_port,
            socket,
            driver,
            registrar,
            provisioner,
            resizer,
            snapshotter,
            pause_dir,
        }
    }

    #[track_caller]
    pub fn assert_running(&mut self) {
        self.driver.assert_running();
        self.registrar.assert_running();
        self.provisioner.assert_running();
        for d in [&mut self.resizer, &mut self.snapshotter]
            .into_iter()
            .flatten()
        {
            d.assert_running();
        }
    }

    /// Stop the sidecars, then the driver (gracefully).
    pub fn stop(&mut self) {
        for d in [&mut self.resizer, &mut self.snapshotter]
            .into_iter()
            .flatten()
        {
            d.stop(Duration::from_secs(5));
        }
        self.provisioner.stop(Duration::from_secs(5));
        self.registrar.stop(Duration::from_secs(5));
        self.driver.stop(Duration::from_secs(15));
    }

    /// SIGKILL the driver and its sidecars, as a machine that dies does.
    pub fn kill(&mut self) {
        for d in [&mut self.resizer, &mut self.snapshotter]
            .into_iter()
            .flatten()
        {
            d.kill();
        }
        self.provisioner.kill();
        self.registrar.kill();
        self.driver.kill();
    }

    /// How many `rpc` calls the driver answered OK, from its /metrics
    /// (all calls counted in the duration histogram minus the errors).
    pub fn rpc_ok_count(&self, rpc: &str) -> u64 {
        let body = http_get_at(&self.metrics_host, self.metrics_port, "/metrics");
        let sum = |prefix: &str| -> u64 {
            body.lines()
                .filter(|l| l.starts_with(prefix) && l.contains(&format!("rpc=\"{rpc}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        sum("kennel_csi_rpc_duration_seconds_count{") - sum("kennel_csi_rpc_errors_total{")
    }

    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.driver.log).unwrap_or_default()
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1.
pub fn http_get(port: u16, path: &str) -> String {
    http_get_at("127.0.0.1", port, path)
}

/// A plain HTTP/1.0 GET on `host`.
pub fn http_get_at(host: &str, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((host, port)).expect("connect metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}
