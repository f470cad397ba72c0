//! The driver's end of the peer channel (`crate::peer`): it serves this node's snapshots to
//! the nodes Kubernetes says restore them, and restores another node's snapshot into a new
//! volume here by pulling its bytes.
//!
//! Set up once at start (`--peer-listen`, with `--kube-api`): the cluster's CA from its Secret
//! (made by the first driver that finds none), a certificate for this node, the listener, and
//! this node's address in its Lease so that pullers find it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::VolumeRecord;
use crate::error::{Error, Result};
use crate::model::spec::CreateRequest;
use crate::model::SnapshotId;
use crate::peer::cluster::{self as peer_cluster, KubeGrants};
use crate::peer::digest::{sha256_of, Sha256};
use crate::peer::{
    pull_snapshot, NodeName, PeerMetrics, PeerService, PeerTls, PullError, PullOptions,
    PullRequest, SnapshotContent, SnapshotSource, TransferStatus, Transfers,
};
use crate::peer::{serve_renewing, SharedTls};
use crate::volume::controller_ops::Controller;

/// How this node joins the channel.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub driver_name: String,
    pub listen: SocketAddr,
    /// Where other nodes reach `listen`.
    pub advertise: SocketAddr,
    /// A pull that receives nothing for this long is resumed.
    pub stall_timeout: Duration,
}

/// This node on the channel: its TLS identity, the API server, and the transfer metrics.
pub struct PeerLink {
    tls: SharedTls,
    client: kube::Client,
    node: NodeName,
    config: PeerConfig,
    metrics: PeerMetrics,
    transfers: Transfers,
}

/// A node certificate is issued again after a third of its life: two thirds are left to
/// retry a renewal that fails.
fn renewal_interval() -> Duration {
    let life = crate::peer::pki::NODE_VALIDITY.whole_seconds().max(3) as u64;
    Duration::from_secs(life / 3)
}

/// How often the pulls under way are published in this node's Lease (when they changed).
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// Publishes this node's pulls under way whenever the list changed since the last success.
async fn publish_transfers(client: kube::Client, node: NodeName, transfers: Transfers) {
    let mut published: Option<Vec<TransferStatus>> = None;
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    loop {
        tick.tick().await;
        let now = transfers.current();
        if published.as_ref() == Some(&now) || (published.is_none() && now.is_empty()) {
            continue;
        }
        match peer_cluster::publish_transfers(&client, &node, &now).await {
            Ok(()) => published = Some(now),
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "could not publish transfers"),
        }
    }
}

impl PeerLink {
    /// Join the channel: CA, certificate, listener on `listen`, `advertise` in this node's
    /// Lease; the server runs until the process ends.
    pub async fn start(
        client: kube::Client,
        controller: Controller,
        config: PeerConfig,
    ) -> Result<PeerLink> {
        let (listen, advertise) = (config.listen, config.advertise);
        let node = NodeName::parse(&controller.identity().node_id)
            .map_err(|e| Error::invalid(format!("--peer-listen: {e}")))?;
        let ca = peer_cluster::load_or_create_ca(&client)
            .await
            .map_err(|e| Error::Unavailable(format!("the cluster's peer CA: {e:#}")))?;
        let identity = ca
            .issue_node(node.as_str())
            .map_err(|e| Error::Internal(format!("a peer certificate for {node}: {e}")))?;
        let tls = SharedTls::new(PeerTls::new(&identity));
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| Error::io("bind the peer address", listen.to_string(), e))?;
        let metrics = PeerMetrics::default();
        let service = PeerService::new(
            Arc::new(HeldSnapshots {
                controller,
                hashes: Mutex::default(),
            }),
            Arc::new(KubeGrants::new(
                client.clone(),
                node.clone(),
                &config.driver_name,
            )),
            metrics.clone(),
        );
        let renew = {
            let (client, node) = (client.clone(), node.clone());
            move || {
                let (client, node) = (client.clone(), node.clone());
                async move {
                    let ca = peer_cluster::load_or_create_ca(&client).await?;
                    let identity = ca.issue_node(node.as_str())?;
                    Ok(PeerTls::new(&identity))
                }
            }
        };
        let server_tls = tls.clone();
        tokio::spawn(async move {
            let every = renewal_interval();
            if let Err(e) = serve_renewing(listener, server_tls, service, every, renew).await {
                tracing::error!(error = %e, "the peer channel stopped");
            }
        });
        peer_cluster::advertise(&client, &node, advertise)
            .await
            .map_err(|e| Error::Unavailable(format!("advertising the peer address: {e:#}")))?;
        tracing::info!(%listen, %advertise, %node, "serving snapshots to peers");
        let transfers = Transfers::default();
        tokio::spawn(publish_transfers(
            client.clone(),
            node.clone(),
            transfers.clone(),
        ));
        Ok(PeerLink {
            tls,
            client,
            node,
            config,
            metrics,
            transfers,
        })
    }

    pub fn metrics(&self) -> &PeerMetrics {
        &self.metrics
    }

    /// Create `req` here from `snapshot`, held by `holder`: its size and the claim come from
    /// the cluster, its bytes from the holder, checked end to end.
    pub async fn restore(
        &self,
        controller: &Controller,
        req: CreateRequest,
        snapshot: &SnapshotId,
        holder: &NodeName,
    ) -> Result<VolumeRecord> {
        let (Some(namespace), Some(claim)) = (
            req.params.pvc_namespace.clone(),
            req.params.pvc_name.clone(),
        ) else {
            return Err(Error::Precondition(format!(
                "snapshot {snapshot} is held by node {holder}: restoring it here needs the \
                 claim's name in the request (the external-provisioner's --extra-create-metadata)"
            )));
        };
        // The claim must say the same as the request: restored from this very snapshot of
        // `holder`, onto this node. Its content's restoreSize is the size to expect.
        let source = peer_cluster::claim_source(
            &self.client,
            &self.config.driver_name,
            &namespace,
            &claim,
            &self.node,
        )
        .await
        .map_err(|e| Error::Unavailable(format!("reading claim {namespace}/{claim}: {e:#}")))?
        .map_err(|why| {
            Error::Precondition(format!(
                "claim {namespace}/{claim} is no restore of snapshot {snapshot}: {why}"
            ))
        })?;
        let expected = format!("{snapshot}@{holder}");
        if source.handle != expected {
            return Err(Error::Precondition(format!(
                "claim {namespace}/{claim} restores {}, not {expected}",
                source.handle
            )));
        }
        let Some(size) = source.restore_size.filter(|s| *s > 0) else {
            return Err(Error::Unavailable(format!(
                "the content of snapshot {expected} reports no restoreSize yet"
            )));
        };
        let address = peer_cluster::peer_address(&self.client, holder)
            .await
            .map_err(|e| Error::Unavailable(format!("node {holder}'s peer address: {e:#}")))?
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "node {holder} advertises no peer address: is its Kennel driver running?"
                ))
            })?;
        let progress = Arc::new(AtomicU64::new(0));
        let _listed = self.transfers.begin(
            TransferStatus {
                claim: format!("{namespace}/{claim}"),
                snapshot: expected,
                from: holder.to_string(),
                done: 0,
                total: size,
                since: k8s_openapi::jiff::Timestamp::now().to_string(),
            },
            progress.clone(),
        );
        let request = PullRequest {
            peer_address: address,
            peer_node: holder.clone(),
            snapshot: snapshot.clone(),
            claim_namespace: namespace,
            claim_name: claim,
            expected_size: size,
        };
        let (tls, metrics) = (self.tls.get(), self.metrics.clone());
        let stall_timeout = self.config.stall_timeout;
        let runtime = tokio::runtime::Handle::current();
        controller
            .create_filled(req, size, move |range| {
                if range.len < request.expected_size {
                    return Err(Error::Internal(format!(
                        "a volume of {} bytes cannot hold a snapshot of {}",
                        range.len, request.expected_size
                    )));
                }
                let destination = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&range.device)
                    .map_err(|e| Error::io("open", range.device.display().to_string(), e))?;
                let options = PullOptions {
                    progress: progress.clone(),
                    destination_offset: range.offset,
                    stall_timeout,
                    metrics,
                    ..PullOptions::default()
                };
                runtime
                    .block_on(pull_snapshot(&tls, &request, &destination, &options))
                    .map(drop)
                    .map_err(pull_error)
            })
            .await
    }
}

/// A failed pull as CreateVolume answers it: retryable failures stay retryable.
fn pull_error(e: PullError) -> Error {
    use tonic::Code;
    let message = format!("pulling the snapshot: {e}");
    match e.code() {
        Code::Unavailable => Error::Unavailable(message),
        Code::Aborted => Error::Busy(message),
        Code::FailedPrecondition | Code::PermissionDenied | Code::NotFound => {
            Error::Precondition(message)
        }
        _ => Error::Internal(message),
    }
}

/// This node's snapshots as the peer server reads them, held while read; their hashes are
/// computed once (a snapshot never changes).
struct HeldSnapshots {
    controller: Controller,
    hashes: Mutex<HashMap<SnapshotId, Sha256>>,
}

impl SnapshotSource for HeldSnapshots {
    async fn open(&self, id: &SnapshotId) -> io::Result<Option<SnapshotContent>> {
        let Some(held) = self
            .controller
            .hold_snapshot(id)
            .await
            .map_err(io::Error::other)?
        else {
            return Ok(None);
        };
        let size = held.record.size_bytes;
        if held.bytes.len < size {
            return Err(io::Error::other(format!(
                "snapshot {id} has {} bytes on disk, less than its {size}",
                held.bytes.len
            )));
        }
        let file = File::open(&held.bytes.device)?;
        let offset = held.bytes.offset;
        let known = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied();
        let sha256 = match known {
            Some(sha256) => sha256,
            None => {
                let reader = file.try_clone()?;
                let sha256 = tokio::task::spawn_blocking(move || sha256_of(&reader, offset, size))
                    .await
                    .map_err(io::Error::other)??;
                self.hashes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), sha256);
                sha256
            }
        };
        Ok(Some(SnapshotContent {
            file,
            offset,
            size,
            sha256,
            hold: Some(Box::new(held.guard)),
        }))
    }
}
