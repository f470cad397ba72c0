//! `kennel driver`: build the backend and serve CSI until told to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::loop_files::{LoopBackend, LoopConfig, Provisioning};
use crate::backend::lvm::params::DeviceClass;
use crate::backend::lvm::{Activation, LvmBackend, LvmConfig};
use crate::backend::Backend;
use crate::csi::driver_metrics::{DriverExporter, Telemetry};
use crate::csi::peer_link::{PeerConfig, PeerLink};
use crate::csi::server::{self, Driver};
use crate::error::{Error, IoContext, Result};
use crate::model::volume_size::parse_size;
use crate::node::host_path::KubeletDir;
use crate::topology::TOPOLOGY_KEY;
use crate::volume::controller_ops::{Controller, NodeIdentity};
use crate::volume::locks::LockMap;
use crate::volume::node_ops::NodeOps;
use crate::volume::work::Work;

pub const DEFAULT_DRIVER_NAME: &str = "kennel.csi.dev";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Loop,
    Lvm,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DriverArgs {
    /// CSI endpoint (unix socket).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/kennel/csi.sock"
    )]
    pub endpoint: String,
    /// Node ID reported to the CO (default: the hostname).
    #[arg(long, env = "KENNEL_NODE_ID")]
    pub node_id: Option<String>,
    #[arg(long, default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    #[arg(long, value_enum, default_value = "loop")]
    pub backend: BackendKind,
    /// Directory holding loop-backed volume images.
    #[arg(long, default_value = "/var/lib/kennel/loop")]
    pub loop_dir: PathBuf,
    /// Pool size for the loop backend, e.g. 100GiB (default: free space minus the reserve).
    #[arg(long, value_parser = parse_size)]
    pub capacity: Option<u64>,
    /// Space kept free on the loop directory's filesystem (default: 5%, at most 10GiB).
    #[arg(long, value_parser = parse_size)]
    pub reserve: Option<u64>,
    /// preallocated: images fully allocated at creation; sparse: overcommit allowed.
    #[arg(long, value_enum, default_value = "preallocated")]
    pub provisioning: Provisioning,
    /// LVM device class: `VG` or `CLASS=VG`; repeat for several classes (the
    /// first is the default; StorageClass parameter `deviceClass` picks one).
    #[arg(long = "volume-group", value_name = "[CLASS=]VG", value_parser = parse_device_class)]
    pub volume_groups: Vec<DeviceClass>,
    /// How LVs are made usable on this node: dm (device-mapper), loop (no
    /// device-mapper: contiguous linear LVs through loop devices) or auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub lvm_activation: Activation,
    /// Thin volumes of a pool may promise at most this multiple of its size.
    #[arg(long, default_value_t = 1.0)]
    pub thin_overprovision_ratio: f64,
    /// Directory of the per-VG lock files (one driver per VG on a host).
    #[arg(long, default_value = "/run/kennel")]
    pub lock_dir: PathBuf,
    /// Seconds between reloads of the LVM index (to notice LVs changed by hand).
    #[arg(long, default_value_t = crate::backend::lvm::DEFAULT_REFRESH.as_secs())]
    pub lvm_refresh_seconds: u64,
    /// The kubelet's root directory: every staging and target path must lie
    /// below it, and it must be on a shared mount (mount propagation).
    #[arg(long, env = "KENNEL_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Refuse to start unless the kubelet directory is on a shared mount.
    /// Only in-process drivers that never stage a volume (controller tests
    /// without root) turn this off; there is no flag for it.
    #[arg(skip = true)]
    pub require_shared_kubelet_dir: bool,
    /// The cgroup hierarchy holding the kubelet's pod cgroups, where volumes'
    /// I/O limits are applied: a cgroup v1 blkio hierarchy (blkio throttle
    /// files) or a cgroup v2 one (io.max). Where the default does not exist
    /// and /sys/fs/cgroup is cgroup v2, that is used.
    #[arg(long, default_value = crate::node::io_throttle::DEFAULT_BLKIO_DIR)]
    pub blkio_cgroup_dir: PathBuf,
    /// Reported in NodeGetInfo (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_volumes_per_node: i64,
    /// Deadline of every host tool the driver runs; tools that work through a whole device
    /// (mkfs, fsck, resize) get 1 s more per GiB. A read-only tool (lvs, blkid…) past it is
    /// killed (SIGTERM, then SIGKILL) and the call answers DEADLINE_EXCEEDED. A tool that
    /// changes on-disk metadata (lvm2 changes, mkfs, e2fsck, resize2fs, xfs_growfs) is never
    /// killed: past it, it is only logged. The caller's own deadline ends its wait; the volume
    /// stays locked until the tool ends, and retries meanwhile answer ABORTED.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub command_timeout: std::time::Duration,
    /// Longest time a snapshot or clone may keep a mounted source's filesystem frozen. An
    /// instant copy (reflink, thin snapshot) fits; a full copy that does not is refused with
    /// FAILED_PRECONDITION rather than stalling the workload.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub freeze_budget: std::time::Duration,
    /// Serve Prometheus metrics (/metrics), /healthz and /readyz on this address, e.g. 0.0.0.0:9808.
    #[arg(long, env = "KENNEL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Use the API server (in-cluster configuration, or KUBECONFIG) for volumes of other
    /// nodes: expansions the elected csi-resizer asks of this node go to the volume's node
    /// through its PV, and this node serves such requests for its own volumes.
    #[arg(long, env = "KENNEL_KUBE_API")]
    pub kube_api: bool,
    /// Serve this node's snapshots to other nodes, and restore theirs here, over mutual TLS
    /// on this address (e.g. 0.0.0.0:9650). Needs --kube-api: the cluster's CA is a Secret,
    /// grants are read from claims, and addresses are published in Leases.
    #[arg(long, env = "KENNEL_PEER_LISTEN", requires = "kube_api")]
    pub peer_listen: Option<SocketAddr>,
    /// The IP other nodes reach --peer-listen's port at (the pod's IP), when the listen
    /// address is not one (0.0.0.0).
    #[arg(long, env = "KENNEL_PEER_ADVERTISE_IP", requires = "peer_listen")]
    pub peer_advertise_ip: Option<std::net::IpAddr>,
    /// A restore's pull that receives nothing for this long is abandoned and resumed from
    /// what is already on disk (a peer or a network that dropped without closing).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub peer_stall_timeout: std::time::Duration,
    /// Where the host's machine ID is read (repeatable, the first valid one wins); by default
    /// /etc/machine-id, then /var/lib/dbus/machine-id. The node DaemonSet mounts the host's /etc
    /// read-only and names its file here: a hostPath of the file itself fails on hosts without it.
    #[arg(long = "machine-id-file", value_name = "PATH")]
    pub machine_id_files: Vec<PathBuf>,
}

fn parse_device_class(raw: &str) -> std::result::Result<DeviceClass, String> {
    DeviceClass::parse(raw).map_err(|e| e.to_string())
}

fn hostname() -> Result<String> {
    nix::unistd::gethostname()
        .map_err(|e| Error::Internal(format!("gethostname: {e}")))?
        .into_string()
        .map_err(|_| Error::Internal("hostname is not UTF-8".to_owned()))
}

/// A driver killed while a snapshot held a volume's filesystem frozen leaves the workload
/// blocked: thaw every staged Kennel filesystem at start-up.
fn thaw_left_frozen(backend: &dyn Backend) {
    let volumes = match backend.list() {
        Ok(volumes) => volumes,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list volumes to thaw frozen filesystems");
            return;
        }
    };
    for volume in volumes {
        let point = backend
            .attached_device(&volume.id)
            .and_then(|device| match device {
                Some(device) => crate::node::mount::mount_point_of(&device),
                None => Ok(None),
            });
        let Ok(Some(point)) = point else {
            continue;
        };
        match crate::node::freeze::thaw(&point) {
            Ok(true) => {
                tracing::warn!(volume_id = %volume.id, mount = %point.display(), "thawed a filesystem left frozen")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(volume_id = %volume.id, error = %e, "could not thaw"),
        }
    }
}

/// Build the driver from its flags (opening the backend, recovering state).
pub fn build(
    args: &DriverArgs,
    cluster: Option<crate::csi::placement::ClusterView>,
) -> Result<Arc<Driver>> {
    if args.max_volumes_per_node < 0 {
        return Err(Error::invalid(
            "--max-volumes-per-node must not be negative",
        ));
    }
    crate::node::cmd::set_timeout(args.command_timeout);
    crate::node::freeze::set_budget(args.freeze_budget);
    let node_id = match &args.node_id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => hostname()?,
    };
    if args.backend != BackendKind::Lvm && !args.volume_groups.is_empty() {
        return Err(Error::invalid("--volume-group needs --backend lvm"));
    }
    let backend: Arc<dyn Backend> = match args.backend {
        BackendKind::Loop => Arc::new(LoopBackend::open(LoopConfig {
            dir: args.loop_dir.clone(),
            capacity: args.capacity,
            reserve: args.reserve,
            provisioning: args.provisioning,
        })?),
        BackendKind::Lvm => Arc::new(LvmBackend::open(LvmConfig {
            classes: args.volume_groups.clone(),
            activation: args.lvm_activation,
            thin_overprovision_ratio: args.thin_overprovision_ratio,
            lock_dir: args.lock_dir.clone(),
            refresh_interval: std::time::Duration::from_secs(args.lvm_refresh_seconds.max(1)),
        })?),
    };
    // A node whose mounts would never reach the pods must not serve.
    let kubelet = KubeletDir::open(&args.kubelet_dir)?;
    if args.require_shared_kubelet_dir {
        kubelet.ensure_shared()?;
    }
    thaw_left_frozen(backend.as_ref());
    let identity = NodeIdentity {
        topology: [(TOPOLOGY_KEY.to_owned(), node_id.clone())].into(),
        node_id,
        machine_id: crate::node::host_identity::host_identity_from(&args.machine_id_files)?,
    };
    // One set of locks and running operations for both services: a volume's controller and
    // node calls are serialized with each other too.
    let work = Work::new(LockMap::default());
    Ok(Arc::new(Driver {
        name: args.driver_name.clone(),
        granularity: backend.granularity(),
        controller: Controller::new(backend.clone(), work.clone(), identity),
        node: NodeOps::new(backend, work.clone(), kubelet)?
            .with_cgroup_dir(args.blkio_cgroup_dir.clone()),
        work,
        max_volumes_per_node: args.max_volumes_per_node,
        telemetry: Arc::new(Telemetry::for_classes(
            args.volume_groups.iter().map(|c| c.name.clone()).collect(),
        )),
        cluster,
        peer: std::sync::OnceLock::new(),
    }))
}

impl DriverArgs {
    /// A loop-backed driver confined to `dir` (socket, images, locks; the
    /// kubelet directory `dir/kubelet`, which the caller makes a shared
    /// mount), for the demo and tests that run the real driver in-process.
    pub fn in_dir(dir: &Path, node_id: &str, capacity: u64, provisioning: Provisioning) -> Self {
        DriverArgs {
            endpoint: format!("unix://{}", dir.join("csi.sock").display()),
            node_id: Some(node_id.to_owned()),
            driver_name: DEFAULT_DRIVER_NAME.to_owned(),
            backend: BackendKind::Loop,
            loop_dir: dir.join("loop"),
            capacity: Some(capacity),
            reserve: Some(0),
            provisioning,
            volume_groups: Vec::new(),
            lvm_activation: Activation::Auto,
            thin_overprovision_ratio: 1.0,
            lock_dir: dir.join("locks"),
            lvm_refresh_seconds: crate::backend::lvm::DEFAULT_REFRESH.as_secs(),
            kubelet_dir: dir.join("kubelet"),
            require_shared_kubelet_dir: true,
            blkio_cgroup_dir: crate::node::io_throttle::DEFAULT_BLKIO_DIR.into(),
            max_volumes_per_node: 0,
            command_timeout: crate::node::cmd::DEFAULT_TIMEOUT,
            freeze_budget: crate::node::freeze::DEFAULT_BUDGET,
            metrics_addr: None,
            machine_id_files: Vec::new(),
            kube_api: false,
            peer_listen: None,
            peer_advertise_ip: None,
            peer_stall_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// A driver served by this process on its socket until stopped.
pub struct LocalDriver {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl LocalDriver {
    pub async fn start(args: &DriverArgs) -> Result<Self> {
        std::fs::create_dir_all(&args.kubelet_dir).ctx("create", &args.kubelet_dir)?;
        let driver = build(args, None)?;
        let listener = server::bind_private(&server::socket_path(&args.endpoint)?)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(driver, listener, async {
            let _ = stopped.await;
        }));
        Ok(LocalDriver { stop, task })
    }

    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| Error::Internal(format!("driver task: {e}")))?
    }
}

/// How often containers started after their volume's publish get its I/O limits on a cgroup
/// v1 node (whose throttles are not hierarchical).
const CONTAINER_LIMITS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Until the process ends: containers get their pods' I/O limits (cgroup v1 only).
async fn keep_container_io_limits(blkio_root: PathBuf) {
    let mut tick = tokio::time::interval(CONTAINER_LIMITS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let at = blkio_root.clone();
        let done = tokio::task::spawn_blocking(move || {
            crate::node::io_throttle::keep_container_rules(&at)
        })
        .await;
        match done {
            Ok(Ok(written)) => {
                failing = false;
                if written > 0 {
                    tracing::debug!(written, "I/O limits given to new containers");
                }
            }
            // Said once per failing spell, not every tick.
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not give containers their pods' I/O limits");
            }
            _ => {}
        }
    }
}

/// Serve until SIGTERM or SIGINT, then stop accepting and return.
pub async fn run(args: DriverArgs) -> Result<()> {
    let cluster = match args.kube_api {
        true => Some(crate::csi::placement::ClusterView::connect(&args.driver_name).await?),
        false => None,
    };
    let driver = build(&args, cluster.clone())?;
    if let Some(listen) = args.peer_listen {
        let client = cluster
            .as_ref()
            .map(|c| c.client())
            .ok_or_else(|| Error::invalid("--peer-listen needs --kube-api"))?;
        let advertise = match args.peer_advertise_ip {
            Some(ip) => SocketAddr::new(ip, listen.port()),
            None if !listen.ip().is_unspecified() => listen,
            None => {
                return Err(Error::invalid(
                    "--peer-listen on an unspecified address needs --peer-advertise-ip",
                ))
            }
        };
        let config = PeerConfig {
            driver_name: args.driver_name.clone(),
            listen,
            advertise,
            stall_timeout: args.peer_stall_timeout,
        };
        let link = PeerLink::start(client, driver.controller.clone(), config).await?;
        let _ = driver.peer.set(link);
    }
    if let Some(cluster) = cluster {
        tokio::spawn(crate::csi::expansion::serve_requests(
            driver.clone(),
            cluster,
        ));
    }
    let socket = server::socket_path(&args.endpoint)?;
    let listener = server::bind_private(&socket)?;
    if let Some(addr) = args.metrics_addr {
        let http = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io("bind metrics address", addr.to_string(), e))?;
        let mut exporter =
            DriverExporter::new(driver.telemetry.clone(), driver.controller.backend_kind());
        if let Some(peer) = driver.peer.get() {
            exporter = exporter.with_peer(peer.metrics());
        }
        let exporter = Arc::new(exporter);
        tracing::info!(addr = %http.local_addr().unwrap_or(addr), "metrics, /healthz and /readyz served");
        tokio::spawn(async move {
            if let Err(e) = crate::metrics_endpoint::serve_listener(http, exporter).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    // Only cgroup v1 needs it; the hierarchy is decided once.
    use crate::node::io_throttle::Hierarchy;
    if let Some(Hierarchy::Blkio(root)) = Hierarchy::find(&args.blkio_cgroup_dir) {
        tokio::spawn(keep_container_io_limits(root));
    }
    tracing::info!(
        endpoint = %args.endpoint,
        node_id = %driver.controller.identity().node_id,
        backend = driver.controller.backend_kind(),
        io_limits = %crate::node::io_throttle::describe(&args.blkio_cgroup_dir),
        version = env!("CARGO_PKG_VERSION"),
        "kennel driver serving"
    );
    server::serve(driver, listener, crate::shutdown::shutdown_signal()).await?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("kennel driver stopped");
    Ok(())
}
