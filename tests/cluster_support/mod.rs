//! A one-node Kubernetes cluster for tests: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd and the kubelet, all
//! started by the test under one temporary directory with its own PKI,
//! ports, sockets, cgroup root and CNI bridge, plus Kennel's node plugin
//! wired the way `deploy/`'s DaemonSet wires it (driver socket under the
//! kubelet's plugin dir, node-driver-registrar, csi-provisioner in
//! node-deployment mode with capacity tracking). Nothing is pulled: the
//! pause and busybox images are made from local files.
//!
//! One cluster per test binary: `run_scenarios` boots it, runs each
//! scenario in its own namespace, one after another, and tears everything
//! down (also when a scenario panics). A run killed before its teardown is
//! swept by the next run.

#![allow(dead_code)]

pub mod bins;
pub mod host;
pub mod images;
pub mod kube;
pub mod netns;
pub mod node_plugin;
pub mod peer_node;
pub mod pki;
pub mod procs;
pub mod retention;
pub mod snapshots;
pub mod workload;

#[path = "../common/vg.rs"]
pub mod vg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

pub use bins::K8s;
pub use host::RunNames;
pub use kube::Kubectl;
pub use node_plugin::{Backend, NodePlugin};
pub use peer_node::PeerNode;
use procs::{free_port, run, run_ok, wait_for, Daemon};
pub use vg::skip::cannot_run;

pub const DRIVER_NAME: &str = "kennel.csi.dev";
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// How the control plane is configured.
#[derive(Debug, Clone, Default)]
pub struct ClusterOpts {
    /// The Kubernetes release (and the sidecars tested with it).
    pub k8s: K8s,
    /// `--feature-gates` for the API server and controller manager.
    pub feature_gates: Option<String>,
    /// The controller manager's `--node-monitor-grace-period` (default 40s).
    pub node_monitor_grace: Option<Duration>,
    /// Kennel runs from `deploy/`, applied by the test: no host-process node plugin, and pods
    /// reach the API server through the `kubernetes` Service (kube-proxy, the API server on the
    /// node's address, a gateway on the pod bridge), as in a real cluster.
    pub deployed: bool,
    /// Names of more nodes, each a network namespace of its own beside the host's node-a
    /// (kubelet, containerd and Kennel's node plugin started there).
    pub peers: Vec<&'static str>,
}

/// Whether this host can run the cluster; if not, fail (or skip loudly).
pub fn can_run_cluster(k8s: K8s) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return !cannot_run("the cluster tests need root");
    }
    if let Some(why) = bins::missing(k8s, k8s.cluster_binaries()) {
        return !cannot_run(&why);
    }
    for tool in [
        "etcd",
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "busybox",
        "kubectl",
        "openssl",
        "losetup",
        // More nodes: network namespaces and veth pairs.
        "ip",
        "nsenter",
    ] {
        if bins::which(tool).is_none() {
            return !cannot_run(&format!(
                "{tool} is not installed (hack/setup-cluster.sh installs the cluster tools)"
            ));
        }
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        return !cannot_run(
            "the CNI plugins are missing from /usr/lib/cni (containernetworking-plugins)",
        );
    }
    if !Path::new("/dev/loop-control").exists() {
        return !cannot_run("/dev/loop-control is missing");
    }
    true
}

pub struct Cluster {
    pub root: PathBuf,
    pub names: RunNames,
    pub kubectl: Kubectl,
    pub admin_kubeconfig: PathBuf,
    pub api_url: String,
    pub node_ip: String,
    pub node_name: String,
    pub bins: BTreeMap<String, PathBuf>,
    pub pki: pki::Pki,
    pub opts: ClusterOpts,
    pub logs: PathBuf,
    pub boot_time: Duration,
    etcd_port: u16,
    control_plane: Vec<Daemon>,
    containerd: Option<Daemon>,
    kubelet: Option<Daemon>,
    pub plugin: Option<NodePlugin>,
    kube_proxy: Option<Daemon>,
    /// The `iptables`/`ip6tables` that had no KUBE-FIREWALL chain before kube-proxy made one.
    firewall_chain_added: Vec<&'static str>,
    /// The pods' subnet on the CNI bridge.
    pub pod_subnet: String,
    /// Other processes a scenario started (e.g. `kennel retention`).
    pub extra: Vec<Daemon>,
    /// Node plugins of lost nodes: their storage stays until teardown.
    retired: Vec<NodePlugin>,
    /// The other nodes (`ClusterOpts::peers`), in their network namespaces.
    pub peers: Vec<PeerNode>,
    /// The pause and busybox images every node's containerd imports.
    image_archives: Vec<PathBuf>,
    /// Keep the components' logs after teardown (a scenario failed).
    pub keep_logs: bool,
    namespaces: usize,
}

impl Cluster {
    pub fn boot(opts: ClusterOpts, backend: Backend) -> Cluster {
        let started = Instant::now();
        host::sweep_stale_runs();
        let id = format!("{:016x}", rand::random::<u64>());
        let names = RunNames::new(&id);
        let root = std::env::temp_dir().join(format!("{}{id}", host::RUN_PREFIX));
        std::fs::create_dir_all(&root).expect("create run dir");
        let root = std::fs::canonicalize(&root).expect("resolve run dir");
        std::fs::write(root.join("owner.pid"), std::process::id().to_string()).expect("write pid");
        std::fs::write(
            root.join("names.json"),
            serde_json::to_vec(&names).expect("json"),
        )
        .expect("write names");
        let mut cluster = Cluster {
            logs: root.join("logs"),
            admin_kubeconfig: root.join("admin.kubeconfig"),
            kubectl: Kubectl::new(&root.join("admin.kubeconfig")),
            api_url: String::new(),
            node_ip: host_ip(),
            node_name: "node-a".to_owned(),
            bins: BTreeMap::new(),
            pki: pki::Pki::create(&root.join("pki")),
            opts,
            boot_time: Duration::ZERO,
            etcd_port: 0,
            control_plane: Vec::new(),
            containerd: None,
            kubelet: None,
            plugin: None,
            kube_proxy: None,
            firewall_chain_added: Vec::new(),
            pod_subnet: String::new(),
            extra: Vec::new(),
            retired: Vec::new(),
            peers: Vec::new(),
            image_archives: Vec::new(),
            keep_logs: false,
            namespaces: 0,
            names,
            root,
        };
        // From here on, a panic drops `cluster`, which tears everything down.
        let k8s = cluster.opts.k8s;
        cluster.bins = bins::install(k8s, k8s.cluster_binaries(), &cluster.root.join("bin"));
        // A client of the cluster's own release where there is one (kubectl's skew policy).
        if let Some(kubectl) = cluster.bins.get("kubectl") {
            cluster.kubectl.program = kubectl.clone();
        }
        cluster.plan_peers();
        cluster.start_etcd();
        cluster.start_containerd();
        cluster.start_control_plane();
        cluster.import_images();
        cluster.start_kubelet();
        cluster.install_kennel_objects();
        if !cluster.opts.peers.is_empty() && !cluster.opts.deployed {
            cluster.start_snapshot_support();
        }
        if cluster.opts.deployed {
            cluster.start_kube_proxy();
            cluster.wait_node_only();
        } else {
            cluster.start_plugin(backend);
            cluster.wait_node_ready();
        }
        cluster.start_peers(backend);
        cluster.boot_time = started.elapsed();
        report(&format!(
            "Kubernetes {} cluster up in {:.1}s ({})",
            cluster.opts.k8s.version(),
            cluster.boot_time.as_secs_f64(),
            cluster.root.display()
        ));
        cluster
    }

    fn bin(&self, name: &str) -> Command {
        Command::new(&self.bins[name])
    }

    fn start_etcd(&mut self) {
        let client = free_port();
        let peer = free_port();
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", self.root.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn");
        self.etcd_port = client;
        self.control_plane
            .push(Daemon::spawn("etcd", cmd, &self.logs));
    }

    fn containerd_dir(&self) -> PathBuf {
        self.root.join("containerd")
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.containerd_dir().join("containerd.sock")
    }

    fn start_containerd(&mut self) {
        let subnet = random_pod_subnet();
        self.pod_subnet = subnet.clone();
        let file = self.containerd_config(
            &self.containerd_dir(),
            &self.root.join("cni"),
            &self.names.bridge,
            &subnet,
        );
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&file);
        self.containerd = Some(Daemon::spawn("containerd", cmd, &self.logs));
    }

    /// A containerd configuration under `dir` whose CNI network (config and IPAM state under
    /// `cni`) is a bridge `bridge` on `subnet`. Returns the file.
    fn containerd_config(&self, dir: &Path, cni: &Path, bridge: &str, subnet: &str) -> PathBuf {
        let cni_conf = cni.join("net.d");
        std::fs::create_dir_all(&cni_conf).expect("create cni dir");
        let conflist = json!({
            "cniVersion": "0.4.0",
            "name": format!("kennel-{}", self.names.id),
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                // Deployed: pods reach the node (and the API server behind the Service).
                "isGateway": self.opts.deployed,
                "isDefaultGateway": self.opts.deployed,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": cni.join("ipam"),
                },
            }],
        });
        std::fs::write(cni_conf.join("10-kennel.conflist"), conflist.to_string())
            .expect("write cni config");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            pause = images::PAUSE_IMAGE,
            cni = cni_conf.display(),
        );
        std::fs::create_dir_all(dir).expect("create containerd dir");
        let file = dir.join("config.toml");
        std::fs::write(&file, config).expect("write containerd config");
        file
    }

    fn start_control_plane(&mut self) {
        let api_port = free_port();
        self.api_url = format!("https://127.0.0.1:{api_port}");
        let pki = &self.pki;
        let mut sans = vec![
            "127.0.0.1",
            "10.0.0.1",
            &self.node_ip,
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ];
        // Other nodes reach the API server on the host's end of their link.
        sans.extend(self.peers.iter().map(|p| p.netns.host_ip.as_str()));
        let apiserver_cert = pki.issue("apiserver", "kube-apiserver", None, &sans);
        let admin = pki.issue("admin", "kennel-admin", Some("system:masters"), &[]);
        pki::kubeconfig_cert(&self.admin_kubeconfig, &self.api_url, &pki.ca_cert, &admin);
        let mut cmd = self.bin("kube-apiserver");
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_port
        ))
        // Deployed, pods reach it on the node's address through the `kubernetes` Service.
        .arg(if self.opts.deployed || !self.peers.is_empty() {
            "--bind-address=0.0.0.0"
        } else {
            "--bind-address=127.0.0.1"
        })
        .arg(format!("--secure-port={api_port}"))
        .arg(format!("--advertise-address={}", self.node_ip))
        .arg(format!("--tls-cert-file={}", apiserver_cert.cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            apiserver_cert.key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!(
            "--service-account-key-file={}",
            pki.sa_pub.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ))
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--authorization-mode=Node,RBAC")
        .arg("--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement")
        .arg(format!(
            "--kubelet-client-certificate={}",
            admin.cert.display()
        ))
        .arg(format!("--kubelet-client-key={}", admin.key.display()))
        .arg(format!(
            "--kubelet-certificate-authority={}",
            pki.ca_cert.display()
        ))
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg(if self.opts.deployed {
            "--endpoint-reconciler-type=lease"
        } else {
            "--endpoint-reconciler-type=none"
        })
        .arg("--profiling=false")
        .arg("--allow-privileged=true");
        if let Some(gates) = &self.opts.feature_gates {
            cmd.arg(format!("--feature-gates={gates}"));
        }
        self.control_plane
            .push(Daemon::spawn("kube-apiserver", cmd, &self.logs));
        let kubectl = self.kubectl.clone();
        wait_for(
            "the API server to be ready",
            60,
            || {
                for d in self.control_plane.iter_mut() {
                    d.assert_running();
                }
                let out = kubectl.try_run(&["get", "--raw", "/readyz"], None);
                out.status.success().then_some(())
            },
            || procs::tail(&self.logs.join("kube-apiserver.log"), 30),
        );
        let kubeconfig = self.admin_kubeconfig.display().to_string();
        let mut kcm = self.bin("kube-controller-manager");
        kcm.arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--authentication-kubeconfig={kubeconfig}"))
            .arg(format!("--authorization-kubeconfig={kubeconfig}"))
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg(format!(
                "--service-account-private-key-file={}",
                self.pki.sa_key.display()
            ))
            .arg(format!("--root-ca-file={}", self.pki.ca_cert.display()))
            .arg("--use-service-account-credentials=false")
            .arg("--concurrent-statefulset-syncs=5");
        if let Some(gates) = &self.opts.feature_gates {
            kcm.arg(format!("--feature-gates={gates}"));
        }
        if let Some(grace) = self.opts.node_monitor_grace {
            kcm.arg(format!("--node-monitor-grace-period={}s", grace.as_secs()))
                .arg("--node-monitor-period=1s");
        }
        self.control_plane
            .push(Daemon::spawn("kube-controller-manager", kcm, &self.logs));
        let mut scheduler = self.bin("kube-scheduler");
        scheduler
            .arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--authentication-kubeconfig={kubeconfig}"))
            .arg(format!("--authorization-kubeconfig={kubeconfig}"))
            .arg("--secure-port=0")
            .arg("--leader-elect=false");
        self.control_plane
            .push(Daemon::spawn("kube-scheduler", scheduler, &self.logs));
    }

    /// `ctr` against the node's containerd, in the kubelet's namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", "k8s.io"])
            .args(args);
        cmd
    }

    fn import_images(&mut self) {
        let work = self.root.join("images");
        std::fs::create_dir_all(&work).expect("create images dir");
        let pause = images::pause_archive(&work, &self.bins["pause"]);
        let busybox = images::busybox_archive(&work);
        let socket = self.containerd_socket();
        let containerd = self.containerd.as_mut().expect("containerd started");
        wait_for(
            "containerd to listen",
            30,
            || {
                containerd.assert_running();
                socket.exists().then_some(())
            },
            String::new,
        );
        self.image_archives = vec![pause.clone(), busybox.clone()];
        for archive in [pause, busybox] {
            let archive = archive.to_str().expect("utf-8 path").to_owned();
            run_ok(
                self.ctr(&["images", "import", "--no-unpack", &archive]),
                120,
            );
        }
    }

    /// Each node gets its own kubelet root, so a replacement node does not
    /// adopt the lost node's state.
    fn kubelet_dir(&self) -> PathBuf {
        self.kubelet_dir_of(&self.node_name)
    }

    pub fn kubelet_dir_of(&self, node: &str) -> PathBuf {
        self.root.join(format!("kubelet-{node}"))
    }

    /// The kubelet's root directory (`--root-dir`), where it stages and
    /// publishes volumes.
    pub fn kubelet_root(&self) -> PathBuf {
        self.kubelet_dir()
    }

    /// Start the kubelet as node `self.node_name`.
    pub fn start_kubelet(&mut self) {
        if !self.root.join("sysctls.saved").exists() {
            host::save_sysctls(&self.root.join("sysctls.saved"));
            host::create_cgroup_root(&self.names.cgroup);
        }
        let site = KubeletSite {
            name: self.node_name.clone(),
            ip: self.node_ip.clone(),
            api_url: self.api_url.clone(),
            cgroup: self.names.cgroup.clone(),
            containerd_socket: self.containerd_socket(),
        };
        let cmd = self.kubelet_command(&site);
        self.kubelet = Some(Daemon::spawn("kubelet", cmd, &self.logs));
    }

    /// The kubelet of node `site.name`, its root directory, certificates and configuration
    /// written under the run's directory.
    fn kubelet_command(&self, site: &KubeletSite) -> Command {
        let name = &site.name;
        let dir = self.kubelet_dir_of(name);
        std::fs::create_dir_all(&dir).expect("create kubelet dir");
        let serving = self.pki.issue(
            &format!("kubelet-{name}-serving"),
            &format!("system:node:{name}"),
            Some("system:nodes"),
            &[&site.ip, "127.0.0.1", name],
        );
        let client = self.pki.issue(
            &format!("kubelet-{name}"),
            &format!("system:node:{name}"),
            Some("system:nodes"),
            &[],
        );
        let kubeconfig = self.root.join(format!("kubelet-{name}.kubeconfig"));
        pki::kubeconfig_cert(&kubeconfig, &site.api_url, &self.pki.ca_cert, &client);
        let mut config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": site.ip,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": self.pki.ca_cert},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "tlsCertFile": serving.cert,
            "tlsPrivateKeyFile": serving.key,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", site.cgroup),
            "cgroupsPerQOS": true,
            "enforceNodeAllocatable": ["pods"],
            "oomScoreAdj": 0,
            "makeIPTablesUtilChains": false,
            "failSwapOn": false,
            // Absolute floors, never percentages: this machine's disk reports a size far beyond
            // what it can hold, so 1% of it can be more than is free, and a DiskPressure taint
            // would keep every test pod from scheduling.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1Mi", "imagefs.available": "1Mi", "nodefs.inodesFree": "100", "imagefs.inodesFree": "100"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "2s",
            "nodeStatusReportFrequency": "10s",
            "serializeImagePulls": false,
            "containerLogMaxSize": "1Mi",
            "volumePluginDir": dir.join("volume-plugins"),
            "shutdownGracePeriod": "0s",
            "resolvConf": "/etc/resolv.conf",
        });
        if self.opts.k8s == K8s::V1_36 {
            // 1.36 refuses cgroup v1 hosts by default; this machine mounts v1 controllers.
            config["failCgroupV1"] = json!(false);
        }
        let config_file = self.root.join(format!("kubelet-{name}.json"));
        std::fs::write(&config_file, config.to_string()).expect("write kubelet config");
        let mut cmd = self.bin("kubelet");
        cmd.arg(format!("--config={}", config_file.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", dir.display()))
            .arg(format!(
                "--cert-dir={}",
                self.root.join(format!("kubelet-pki-{name}")).display()
            ))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={}", site.ip))
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                site.containerd_socket.display()
            ))
            .arg("--v=2");
        cmd
    }

    /// Stop the kubelet (its pods keep running, as on a node whose kubelet died).
    pub fn stop_kubelet(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.stop(Duration::from_secs(10));
        }
    }

    /// The namespace, CSIDriver, StorageClasses and RBAC from `deploy/`.
    fn install_kennel_objects(&mut self) {
        let deploy = Path::new(REPO).join("deploy");
        wait_for(
            "the default namespace",
            60,
            || self.kubectl.get(&["namespace", "default"]),
            || procs::tail(&self.logs.join("kube-apiserver.log"), 20),
        );
        if self.opts.deployed {
            return;
        }
        for file in [
            "base/namespace.yaml",
            "base/csidriver.yaml",
            "base/node-rbac.yaml",
            "base/retention-rbac.yaml",
            "overlays/loop/storageclass.yaml",
            "overlays/lvm/storageclasses.yaml",
        ] {
            self.kubectl.apply_file(&deploy.join(file));
        }
    }

    /// kube-proxy (iptables): Services, above all `kubernetes`, reach their endpoints.
    fn start_kube_proxy(&mut self) {
        // kube-proxy adds a filter chain its --cleanup leaves behind: note where it is new.
        self.firewall_chain_added = ["iptables", "ip6tables"]
            .into_iter()
            .filter(|tool| !firewall_chain_exists(tool))
            .collect();
        let mut cmd = self.bin("kube-proxy");
        cmd.arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .arg(format!("--hostname-override={}", self.node_name))
            .arg("--proxy-mode=iptables")
            .arg(format!("--cluster-cidr={}", self.pod_subnet))
            // Leave the host's conntrack settings alone.
            .arg("--conntrack-max-per-core=0")
            .arg("--conntrack-tcp-timeout-established=0")
            .arg("--conntrack-tcp-timeout-close-wait=0")
            .arg(format!("--healthz-bind-address=127.0.0.1:{}", free_port()))
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()))
            .arg("--v=2");
        self.kube_proxy = Some(Daemon::spawn("kube-proxy", cmd, &self.logs));
    }

    /// Stop kube-proxy and remove the rules it wrote.
    fn stop_kube_proxy(&mut self) {
        if let Some(mut proxy) = self.kube_proxy.take() {
            proxy.stop(Duration::from_secs(5));
            let mut cleanup = self.bin("kube-proxy");
            cleanup.arg("--cleanup").arg("--proxy-mode=iptables");
            let out = run(cleanup, 60);
            if !out.status.success() {
                eprintln!(
                    "kube-proxy --cleanup: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for tool in std::mem::take(&mut self.firewall_chain_added) {
            if !firewall_chain_exists(tool) {
                continue;
            }
            for hook in ["INPUT", "OUTPUT"] {
                let mut cmd = Command::new(tool);
                cmd.args(["-w", "-D", hook, "-j", "KUBE-FIREWALL"]);
                run(cmd, 30);
            }
            for flag in ["-F", "-X"] {
                let mut cmd = Command::new(tool);
                cmd.args(["-w", flag, "KUBE-FIREWALL"]);
                run(cmd, 30);
            }
        }
    }

    /// Node Ready (no driver expected yet).
    pub fn wait_node_only(&mut self) {
        let name = self.node_name.clone();
        let kubectl = self.kubectl.clone();
        let logs = self.logs.clone();
        wait_for(
            &format!("node {name} Ready"),
            120,
            || {
                if let Some(k) = self.kubelet.as_mut() {
                    k.assert_running();
                }
                let node = kubectl.get(&["node", &name])?;
                (kube::condition(&node, "Ready") == Some("True")).then_some(())
            },
            || procs::tail(&logs.join("kubelet.log"), 30),
        );
    }

    /// Import a docker-archive into the node's containerd.
    pub fn import_image(&self, archive: &Path) {
        let archive = archive.to_str().expect("utf-8 path").to_owned();
        run_ok(self.ctr(&["images", "import", &archive]), 300);
    }

    /// A token of `kennel-system/<account>`, in a kubeconfig, so a process
    /// runs with exactly the permissions `deploy/` grants it.
    pub fn service_account_kubeconfig(&self, account: &str) -> PathBuf {
        self.service_account_kubeconfig_at(account, &self.api_url, account)
    }

    /// The same, reaching the API server at `server`, written as `<file>.kubeconfig`.
    pub fn service_account_kubeconfig_at(
        &self,
        account: &str,
        server: &str,
        file: &str,
    ) -> PathBuf {
        let kubectl = self.kubectl.clone();
        let token = wait_for(
            &format!("a token for service account {account}"),
            60,
            || {
                let out = kubectl.try_run(
                    &[
                        "create",
                        "token",
                        account,
                        "-n",
                        "kennel-system",
                        "--duration=24h",
                    ],
                    None,
                );
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            },
            String::new,
        );
        let file = self.root.join(format!("{file}.kubeconfig"));
        pki::kubeconfig_token(&file, server, &self.pki.ca_cert, &token);
        file
    }

    /// Start Kennel's node plugin on `backend` for the current node.
    pub fn start_plugin(&mut self, backend: Backend) {
        let kubeconfig = self.service_account_kubeconfig("kennel-node");
        let plugin = NodePlugin::start(self, backend, &kubeconfig);
        self.plugin = Some(plugin);
    }

    /// Stop the node plugin (driver, registrar, provisioner); its storage
    /// stays (the LVM volume group is kept by the returned plugin).
    pub fn stop_plugin(&mut self) -> Option<NodePlugin> {
        let mut plugin = self.plugin.take()?;
        plugin.stop();
        Some(plugin)
    }

    pub fn plugin(&self) -> &NodePlugin {
        self.plugin.as_ref().expect("node plugin is running")
    }

    /// Switch the node plugin to another backend (volumes of the old one
    /// must be gone: its storage is removed).
    pub fn use_backend(&mut self, backend: Backend) {
        if self.plugin.as_ref().is_some_and(|p| p.backend == backend) {
            return;
        }
        drop(self.stop_plugin());
        self.start_plugin(backend);
        self.wait_node_ready();
    }

    /// Node Ready and Kennel's driver registered in its CSINode.
    pub fn wait_node_ready(&mut self) {
        let name = self.node_name.clone();
        let kubectl = self.kubectl.clone();
        let logs = self.logs.clone();
        wait_for(
            &format!("node {name} Ready with {DRIVER_NAME} in its CSINode"),
            120,
            || {
                if let Some(k) = self.kubelet.as_mut() {
                    k.assert_running();
                }
                if let Some(p) = self.plugin.as_mut() {
                    p.assert_running();
                }
                ready_with_driver(&kubectl, &name)
            },
            || {
                format!(
                    "kubelet:\n{}\nregistrar:\n{}",
                    procs::tail(&logs.join("kubelet.log"), 30),
                    procs::tail(&logs.join("node-driver-registrar.log"), 10)
                )
            },
        );
    }

    /// The node dies: its driver deregisters (when `deregister`; a
    /// crashed machine leaves its CSINode entry behind), its kubelet stops
    /// and its containers are killed. Its storage stays on the host.
    pub fn lose_node(&mut self, deregister: bool) {
        let name = self.node_name.clone();
        if deregister {
            if let Some(plugin) = self.stop_plugin() {
                self.retired.push(plugin);
            }
            let kubectl = self.kubectl.clone();
            wait_for(
                &format!("{DRIVER_NAME} gone from CSINode {name}"),
                60,
                || {
                    let csinode = kubectl.get(&["csinode", &name])?;
                    (!csinode["spec"]["drivers"]
                        .as_array()
                        .is_some_and(|d| d.iter().any(|d| d["name"] == DRIVER_NAME)))
                    .then_some(())
                },
                String::new,
            );
        }
        self.stop_kubelet();
        if let Some(plugin) = self.stop_plugin() {
            self.retired.push(plugin);
        }
        host::kill_containers(&self.names);
    }

    /// A new node `name` joins (kubelet and Kennel's node plugin on fresh
    /// storage) and becomes the cluster's node.
    pub fn add_node(&mut self, name: &str, backend: Backend) {
        self.node_name = name.to_owned();
        self.start_kubelet();
        self.start_plugin(backend);
        self.wait_node_ready();
    }

    /// A fresh namespace for one scenario, named after it.
    pub fn namespace(&mut self, scenario: &str) -> String {
        self.namespaces += 1;
        let ns = format!(
            "{}{}-{}",
            self.names.namespace_prefix(),
            self.namespaces,
            scenario
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                })
                .collect::<String>()
        );
        let ns: String = ns
            .chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches('-')
            .to_owned();
        self.kubectl.run(&["create", "namespace", &ns]);
        let kubectl = self.kubectl.clone();
        wait_for(
            &format!("the default service account of {ns}"),
            60,
            || kubectl.get(&["serviceaccount", "default", "-n", &ns]),
            String::new,
        );
        ns
    }

    /// Tails of every log, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.logs) {
            let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                out.push_str(&format!(
                    "==== {} ====\n{}\n",
                    f.display(),
                    procs::tail(&f, 15)
                ));
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep_logs
            || std::thread::panicking()
            || std::env::var_os("KENNEL_CLUSTER_LOGS").is_some()
        {
            let saved = std::env::temp_dir().join(format!("kennel-cluster-logs-{}", self.names.id));
            let _ = std::fs::create_dir_all(&saved);
            if let Ok(dir) = std::fs::read_dir(&self.logs) {
                for e in dir.flatten() {
                    let _ = std::fs::copy(e.path(), saved.join(e.file_name()));
                }
            }
            report(&format!("cluster logs kept in {}", saved.display()));
        }
        for d in self.extra.iter_mut() {
            d.stop(Duration::from_secs(5));
        }
        self.stop_kubelet();
        let plugin = self.stop_plugin();
        let retired = std::mem::take(&mut self.retired);
        let peer_plugins = self.stop_peers();
        self.stop_kube_proxy();
        if self.opts.deployed {
            // deploy/'s pods live in kennel-system, not in a namespace named after the run.
            host::remove_pod_logs("kennel-system_");
            // deploy/components/snapshot-controller runs in kube-system.
            host::remove_pod_logs("kube-system_snapshot-controller-");
        }
        // Containers and their mounts go before the volume group under them.
        self.containerd.take();
        self.control_plane.clear();
        let problems = host::teardown(&self.root, &self.names);
        drop(plugin);
        drop(retired);
        drop(peer_plugins);
        if !problems.is_empty() && !std::thread::panicking() {
            panic!("cluster teardown left host state behind: {problems:?}");
        }
    }
}

/// Node `name` is Ready and Kennel's driver is in its CSINode.
fn ready_with_driver(kubectl: &Kubectl, name: &str) -> Option<()> {
    let node = kubectl.get(&["node", name])?;
    if kube::condition(&node, "Ready") != Some("True") {
        return None;
    }
    let csinode = kubectl.get(&["csinode", name])?;
    csinode["spec"]["drivers"]
        .as_array()?
        .iter()
        .any(|d| d["name"] == DRIVER_NAME)
        .then_some(())
}

/// Where and how one node's kubelet runs.
pub struct KubeletSite {
    pub name: String,
    pub ip: String,
    /// The API server as this node reaches it.
    pub api_url: String,
    /// The kubelet's `cgroupRoot` (a directory in every hierarchy).
    pub cgroup: String,
    pub containerd_socket: PathBuf,
}

/// A /24 for one node's pods, unlikely to meet another run's.
fn random_pod_subnet() -> String {
    format!(
        "10.{}.{}.0/24",
        200 + rand::random::<u8>() % 50,
        rand::random::<u8>()
    )
}

/// Whether `tool` (iptables or ip6tables) has the filter chain KUBE-FIREWALL.
fn firewall_chain_exists(tool: &str) -> bool {
    let mut cmd = Command::new(tool);
    cmd.args(["-w", "-S", "KUBE-FIREWALL"]);
    run(cmd, 30).status.success()
}

/// The address of the host's default route, used as the node's IP.
fn host_ip() -> String {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind udp");
    if socket.connect("192.0.2.1:9").is_ok() || socket.connect("10.255.255.1:9").is_ok() {
        if let Ok(addr) = socket.local_addr() {
            if !addr.ip().is_loopback() && !addr.ip().is_unspecified() {
                return addr.ip().to_string();
            }
        }
    }
    let mut cmd = Command::new("hostname");
    cmd.arg("-I");
    run(cmd, 10)
        .stdout
        .split(|b| b.is_ascii_whitespace())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .find(|w| w.parse::<std::net::Ipv4Addr>().is_ok())
        .expect("a non-loopback host address for the node")
}

/// Print past cargo's output capture.
pub fn report(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "cluster: {line}");
    let _ = out.flush();
}

/// Keep the cluster up for a person (`hack/cluster.sh`) until stdin
/// reaches a newline or its end.
fn hold(cluster: &Cluster) {
    report(&format!(
        "holding the cluster: export KUBECONFIG={}  (node {}, logs in {}); press Enter to tear it down",
        cluster.admin_kubeconfig.display(),
        cluster.node_name,
        cluster.logs.display()
    ));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// One named scenario.
pub type Scenario = (&'static str, fn(&mut Cluster));

/// Boot one cluster, run every scenario on it one after another (each is
/// timed and caught, so one failing does not hide the others), tear it
/// down, then fail naming every failed scenario.
pub fn run_scenarios(opts: ClusterOpts, backend: Backend, scenarios: &[Scenario]) {
    if !can_run_cluster(opts.k8s) {
        return;
    }
    let filter = std::env::var("KENNEL_CLUSTER_SCENARIOS").ok();
    let mut cluster = Cluster::boot(opts, backend);
    if std::env::var_os("KENNEL_CLUSTER_HOLD").is_some() {
        hold(&cluster);
    }
    let mut failed = Vec::new();
    for (name, scenario) in scenarios {
        if filter
            .as_ref()
            .is_some_and(|f| !f.split(',').any(|s| name.contains(s)))
        {
            continue;
        }
        let started = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&mut cluster)));
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => report(&format!("scenario {name}: ok in {took:.1}s")),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                report(&format!("scenario {name}: FAILED after {took:.1}s"));
                eprintln!("---- {name} ----\n{msg}\n{}", cluster.diagnostics());
                failed.push(*name);
                cluster.keep_logs = true;
            }
        }
    }
    let boot = cluster.boot_time;
    let started = Instant::now();
    drop(cluster);
    report(&format!(
        "boot {:.1}s, teardown {:.1}s",
        boot.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}
