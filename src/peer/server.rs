//! The serving end of the channel: answers `ReadSnapshot` for the node a grant names, and
//! streams the snapshot from disk in chunks, reading ahead only as far as the network drains.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

use super::digest::{hex, Sha256, BLOCK};
use super::metrics::{Milestones, PeerMetrics};
use super::name::{is_dns1123_label, is_dns1123_subdomain, NodeName};
use super::pb::peer_server::{Peer, PeerServer};
use super::pb::{
    snapshot_chunk::Part, DataChunk, ReadSnapshotRequest, SnapshotChunk, SnapshotHeader,
};
use super::tls::{caller_node, PeerTls};
use crate::model::id::SnapshotId;

/// Offsets a read may start at: block-aligned, as the client's durable points are.
pub const ALIGNMENT: u64 = 4096;
/// Chunks read ahead of what the network has taken: memory per transfer stays a few MiB.
const READ_AHEAD: usize = 4;
/// A peer that vanished without closing its connection is noticed within a minute.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A snapshot as the server reads it: `size` bytes of a file (an image file or a block
/// device) from `offset`, and their SHA-256. `hold` lives as long as the read: what keeps
/// the snapshot from being deleted while its bytes are sent.
pub struct SnapshotContent {
    pub file: File,
    pub offset: u64,
    pub size: u64,
    pub sha256: Sha256,
    pub hold: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for SnapshotContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotContent")
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("sha256", &hex(&self.sha256))
            .finish_non_exhaustive()
    }
}

/// Where the server finds snapshots. `Ok(None)`: this node holds no snapshot with this ID.
pub trait SnapshotSource: Send + Sync + 'static {
    fn open(
        &self,
        id: &SnapshotId,
    ) -> impl Future<Output = io::Result<Option<SnapshotContent>>> + Send;
}

/// Who may read what: `requester` may read `snapshot` to restore it into the claim
/// `claim_namespace/claim_name`. An error means the grant could not be checked (retryable).
pub trait Grants: Send + Sync + 'static {
    fn granted(
        &self,
        requester: &NodeName,
        snapshot: &SnapshotId,
        claim_namespace: &str,
        claim_name: &str,
    ) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// The `kennel.peer.v1.Peer` service over a snapshot source and a grant check.
pub struct PeerService<S, G> {
    source: Arc<S>,
    grants: Arc<G>,
    metrics: PeerMetrics,
}

impl<S, G> Clone for PeerService<S, G> {
    fn clone(&self) -> Self {
        PeerService {
            source: self.source.clone(),
            grants: self.grants.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S: SnapshotSource, G: Grants> PeerService<S, G> {
    pub fn new(source: Arc<S>, grants: Arc<G>, metrics: PeerMetrics) -> Self {
        PeerService {
            source,
            grants,
            metrics,
        }
    }

    async fn start(
        &self,
        caller: NodeName,
        req: ReadSnapshotRequest,
    ) -> Result<ReceiverStream<Result<SnapshotChunk, Status>>, Status> {
        let id = SnapshotId::parse(&req.snapshot_id).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{:?} is not a Kennel snapshot ID",
                shown(&req.snapshot_id)
            ))
        })?;
        if !is_dns1123_label(&req.claim_namespace) || !is_dns1123_subdomain(&req.claim_name) {
            return Err(Status::invalid_argument(format!(
                "{:?}/{:?} is not a claim's namespace and name",
                shown(&req.claim_namespace),
                shown(&req.claim_name)
            )));
        }
        let claim = format!("{}/{}", req.claim_namespace, req.claim_name);
        // The grant comes first: a refused node learns nothing of the snapshot, not even
        // whether it exists here.
        let granted = self
            .grants
            .granted(&caller, &id, &req.claim_namespace, &req.claim_name)
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the grant: {e:#}")))?;
        if !granted {
            return Err(Status::permission_denied(format!(
                "node {caller} may not read snapshot {id} for claim {claim}"
            )));
        }
        let content = self
            .source
            .open(&id)
            .await
            .map_err(|e| Status::internal(format!("opening snapshot {id}: {e}")))?
            .ok_or_else(|| Status::not_found(format!("snapshot {id} is not on this node")))?;
        check_offset(req.offset, content.size)?;
        tracing::info!(
            snapshot = %id, node = %caller, %claim, offset = req.offset, size = content.size,
            sha256 = %hex(&content.sha256), "serving a snapshot to a peer"
        );
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let transfer = Transfer {
            id,
            caller,
            content,
            from: req.offset,
            metrics: self.metrics.clone(),
        };
        tokio::task::spawn_blocking(move || transfer.run(&tx));
        Ok(ReceiverStream::new(rx))
    }
}

/// A resume point must lie within the snapshot and on a block boundary (or be its end).
pub fn check_offset(offset: u64, size: u64) -> Result<(), Status> {
    if offset > size {
        return Err(Status::out_of_range(format!(
            "offset {offset} is past the snapshot's end ({size} bytes)"
        )));
    }
    if !offset.is_multiple_of(ALIGNMENT) && offset != size {
        return Err(Status::invalid_argument(format!(
            "offset {offset} is neither a multiple of {ALIGNMENT} nor the snapshot's size"
        )));
    }
    Ok(())
}

/// At most 64 characters of an untrusted string, for messages.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

#[tonic::async_trait]
impl<S: SnapshotSource, G: Grants> Peer for PeerService<S, G> {
    type ReadSnapshotStream = ReceiverStream<Result<SnapshotChunk, Status>>;

    async fn read_snapshot(
        &self,
        request: Request<ReadSnapshotRequest>,
    ) -> Result<Response<Self::ReadSnapshotStream>, Status> {
        let started = match caller_node(&request) {
            Ok(caller) => self.start(caller, request.into_inner()).await,
            Err(status) => Err(status),
        };
        started.map(Response::new).inspect_err(|status| {
            self.metrics.read_done(status.code());
            let (code, message) = (status.code(), status.message());
            tracing::warn!(?code, message, "refused a peer's snapshot read");
        })
    }
}

/// One read being streamed: runs on a blocking thread, one chunk at a time, each sent before
/// the next is read, so a slow network slows the disk instead of filling memory.
struct Transfer {
    id: SnapshotId,
    caller: NodeName,
    content: SnapshotContent,
    from: u64,
    metrics: PeerMetrics,
}

impl Transfer {
    fn run(self, tx: &mpsc::Sender<Result<SnapshotChunk, Status>>) {
        let started = Instant::now();
        let mut offset = self.from;
        let code = self.send(tx, &mut offset);
        self.metrics.read_done(code);
        let (id, node) = (&self.id, &self.caller);
        let sent = offset - self.from;
        let seconds = started.elapsed().as_secs_f64();
        if code == Code::Ok {
            tracing::info!(snapshot = %id, %node, sent, seconds, "served a snapshot");
        } else {
            tracing::warn!(snapshot = %id, %node, sent, seconds, ?code, "a snapshot read stopped");
        }
    }

    /// The header, then every chunk from `offset` on; the code the read ends with. A closed
    /// channel means the caller went away.
    fn send(&self, tx: &mpsc::Sender<Result<SnapshotChunk, Status>>, offset: &mut u64) -> Code {
        let size = self.content.size;
        let header = Part::Header(SnapshotHeader {
            size_bytes: size,
            sha256: self.content.sha256.to_vec(),
        });
        if tx
            .blocking_send(Ok(SnapshotChunk { part: Some(header) }))
            .is_err()
        {
            return Code::Cancelled;
        }
        let mut milestones = Milestones::new(size, *offset);
        while *offset < size {
            let len = usize::try_from(size - *offset).map_or(BLOCK, |left| left.min(BLOCK));
            let mut data = vec![0u8; len];
            let at = self.content.offset + *offset;
            if let Err(e) = self.content.file.read_exact_at(&mut data, at) {
                let status = Status::internal(format!(
                    "reading snapshot {} at offset {offset}: {e}",
                    self.id
                ));
                let _ = tx.blocking_send(Err(status));
                return Code::Internal;
            }
            let chunk = Part::Data(DataChunk {
                offset: *offset,
                data,
            });
            if tx
                .blocking_send(Ok(SnapshotChunk { part: Some(chunk) }))
                .is_err()
            {
                return Code::Cancelled;
            }
            *offset += len as u64;
            self.metrics.served(len as u64);
            // Where a test holds a transfer mid-way (to cut the network under it).
            crate::faults::step("peer read: chunk sent");
            if let Some(percent) = milestones.passed(*offset) {
                let (id, node) = (&self.id, &self.caller);
                tracing::info!(snapshot = %id, %node, offset, size, "served {percent}%");
            }
        }
        Code::Ok
    }
}

/// Serve the peer channel on `listener` with mutual TLS until `shutdown` completes (in-flight
/// reads are then let finish; drop the future to cut them, and their clients resume).
pub async fn serve<S: SnapshotSource, G: Grants>(
    listener: TcpListener,
    tls: &PeerTls,
    service: PeerService<S, G>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    server(tls)?
        .add_service(PeerServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// Serves the connections `incoming` yields until it ends. The connections already taken go
/// on to their own end, untouched: with no shutdown signal, tonic runs each as a task of its
/// own and tells none to go away. How a renewal retires a certificate without cutting a stream.
pub async fn serve_connections<S: SnapshotSource, G: Grants>(
    incoming: impl tokio_stream::Stream<Item = io::Result<tokio::net::TcpStream>> + Send + 'static,
    tls: &PeerTls,
    service: PeerService<S, G>,
) -> Result<(), tonic::transport::Error> {
    server(tls)?
        .add_service(PeerServer::new(service))
        .serve_with_incoming(incoming)
        .await
}

fn server(tls: &PeerTls) -> Result<Server, tonic::transport::Error> {
    Ok(Server::builder()
        .tls_config(tls.server_config())?
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_must_be_aligned_and_within_the_snapshot() {
        let size = 3 * ALIGNMENT + 100;
        for ok in [0, ALIGNMENT, 3 * ALIGNMENT, size] {
            assert!(check_offset(ok, size).is_ok(), "{ok}");
        }
        assert_eq!(
            check_offset(1, size).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            check_offset(size - 1, size).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            check_offset(size + 1, size).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            check_offset(4 * ALIGNMENT, size).unwrap_err().code(),
            Code::OutOfRange
        );
        assert!(check_offset(0, 0).is_ok());
    }
}
