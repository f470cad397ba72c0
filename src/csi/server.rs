//! The gRPC server on a Unix socket.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::backend::VolumeRecord;
use crate::csi::controller_service::ControllerService;
use crate::csi::driver_metrics::{RpcMetricsLayer, Telemetry, OBSERVE_PERIOD};
use crate::csi::group_controller_service::GroupControllerService;
use crate::csi::identity_service::IdentityService;
use crate::csi::node_service::NodeService;
use crate::csi::pb::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
};
use crate::error::{Error, IoContext, Result};
use crate::model::spec::{PARAM_PVC_NAME, PARAM_PVC_NAMESPACE, PARAM_PV_NAME};
use crate::volume::controller_ops::Controller;
use crate::volume::node_ops::NodeOps;
use crate::volume::work::Work;

/// Volume context keys naming where a volume's data lives.
pub const CONTEXT_NODE: &str = "kennel.csi.dev/node";
pub const CONTEXT_MACHINE_ID: &str = "kennel.csi.dev/machine-id";

/// Everything the three services share.
pub struct Driver {
    pub name: String,
    pub controller: Controller,
    pub node: NodeOps,
    /// The operations both services run: `serve` waits for them before it returns.
    pub work: Work,
    pub max_volumes_per_node: i64,
    pub granularity: u64,
    /// Calls counted by the layer `serve` puts around every call, and the backend as last
    /// observed by the task `serve` runs.
    pub telemetry: Arc<Telemetry>,
    /// The API server, when the driver may read it (`--kube-api`): where other nodes'
    /// volumes are.
    pub cluster: Option<crate::csi::placement::ClusterView>,
    /// The peer channel (`--peer-listen`), once joined: restores of other nodes' snapshots.
    pub peer: std::sync::OnceLock<crate::csi::peer_link::PeerLink>,
}

impl Driver {
    pub fn volume_context(&self, record: &VolumeRecord) -> BTreeMap<String, String> {
        let mut ctx = record.params.to_context();
        // Where the data came from, so every volume can be traced to its claim.
        let claim = [
            (PARAM_PVC_NAME, &record.params.pvc_name),
            (PARAM_PVC_NAMESPACE, &record.params.pvc_namespace),
            (PARAM_PV_NAME, &record.params.pv_name),
        ];
        for (key, value) in claim {
            if let Some(value) = value {
                ctx.insert(key.to_owned(), value.clone());
            }
        }
        ctx.insert(CONTEXT_NODE.to_owned(), record.node_id.clone());
        ctx.insert(CONTEXT_MACHINE_ID.to_owned(), record.machine_id.clone());
        ctx
    }
}

/// `unix:///run/kennel/csi.sock` or a plain path → the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| (!endpoint.contains("://")).then_some(endpoint))
        .ok_or_else(|| Error::invalid(format!("endpoint {endpoint:?} must be unix:///path")))?;
    if !path.starts_with('/') {
        return Err(Error::invalid(format!(
            "endpoint {endpoint:?} must be an absolute unix socket path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Bind a socket only its owner can use. A stale socket is removed; any other
/// file at the path is left alone and reported.
pub fn bind_private(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).ctx("create", parent)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).ctx("remove stale socket", path)?
        }
        Ok(_) => {
            return Err(Error::Precondition(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )))
        }
        Err(_) => {}
    }
    // Bind under a restrictive umask so the socket is never reachable by others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.ctx("bind", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).ctx("chmod", path)?;
    Ok(listener)
}

/// Serve Identity, Controller, GroupController and Node until `shutdown` resolves. Every call is counted and
/// timed in `driver.telemetry` and runs in a span naming its RPC; the backend is observed in the
/// background meanwhile.
pub async fn serve(
    driver: Arc<Driver>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let observer = tokio::spawn(
        driver
            .telemetry
            .clone()
            .keep_fresh(driver.controller.backend(), OBSERVE_PERIOD),
    );
    let work = driver.work.clone();
    let served = tonic::transport::Server::builder()
        .layer(RpcMetricsLayer::new(driver.telemetry.clone()))
        .add_service(IdentityServer::new(IdentityService::new(driver.clone())))
        .add_service(ControllerServer::new(ControllerService::new(
            driver.clone(),
        )))
        .add_service(GroupControllerServer::new(GroupControllerService::new(
            driver.clone(),
        )))
        .add_service(NodeServer::new(NodeService::new(driver)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")));
    // Callers that gave up may have left operations running: they end before the driver does,
    // so no tool is killed mid-change by the process exiting.
    work.stop().await;
    observer.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            socket_path("unix:///run/kennel/csi.sock").expect("test setup"),
            PathBuf::from("/run/kennel/csi.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").expect("test setup"),
            PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_socket_replaced() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("csi.sock");
        drop(bind_private(&path).expect("test setup"));
        // The old socket file is still there: a stale socket.
        let _listener = bind_private(&path).expect("test setup");
        let mode = fs::metadata(&path)
            .expect("test setup")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let other = dir.path().join("file");
        fs::write(&other, b"x").expect("test setup");
        assert!(bind_private(&other).is_err());
        assert!(other.exists());
    }
}
