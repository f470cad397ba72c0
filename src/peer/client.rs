//! The pulling end: copies a snapshot from a peer into a destination the caller opened (a block
//! device or an image file), writing each chunk at its offset. The only copy is the destination.
//!
//! A cut connection is resumed from the last offset known to be on disk (synced every
//! `sync_every` bytes); the whole is verified by re-reading the destination and comparing its
//! SHA-256 with the peer's. Dropping the future stops the pull; the destination is then partial
//! and the caller deletes it, as after any error.

mod check;
mod error;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use self::check::{check_header, Advertised, Chunks};
pub use self::error::PullError;
use self::error::{from_status, from_transport, Failure};
use super::digest::{hex, sha256_of, Sha256};
use super::metrics::{Milestones, PeerMetrics};
use super::name::NodeName;
use super::pb::peer_client::PeerClient;
use super::pb::{snapshot_chunk::Part, ReadSnapshotRequest, SnapshotChunk};
use super::tls::PeerTls;
use crate::model::id::SnapshotId;

const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What to pull, from whom, and how big it must be.
#[derive(Debug, Clone)]
pub struct PullRequest {
    /// The peer driver's TCP address.
    pub peer_address: SocketAddr,
    /// The node the peer's certificate must name.
    pub peer_node: NodeName,
    pub snapshot: SnapshotId,
    /// The claim being restored, which the peer's grant check looks up.
    pub claim_namespace: String,
    pub claim_name: String,
    /// The snapshot's size as the caller knows it; the destination holds at least this much.
    pub expected_size: u64,
}

/// How hard to try, how often to sync, and where to report progress.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The whole pull, every attempt and wait included.
    pub deadline: Duration,
    /// Attempts in a row that bring no new byte durably to the destination before giving up.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Bytes written between two fdatasyncs: what a resume may have to fetch again.
    pub sync_every: u64,
    /// An attempt that receives nothing for this long is abandoned and resumed.
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    /// Bytes of the snapshot written so far (goes back to the durable offset on a resume).
    pub progress: Arc<AtomicU64>,
    /// Where the snapshot's first byte goes in the destination: a volume can be a range of a
    /// larger device (an LV inside its volume group's physical volume).
    pub destination_offset: u64,
    pub metrics: PeerMetrics,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            deadline: Duration::from_secs(3600),
            max_attempts: 8,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            sync_every: 64 << 20,
            stall_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            progress: Arc::default(),
            destination_offset: 0,
            metrics: PeerMetrics::default(),
        }
    }
}

/// A pull that completed and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub size: u64,
    pub sha256: Sha256,
    pub attempts: u32,
    /// The offset each attempt after the first resumed from.
    pub resumed_from: Vec<u64>,
}

/// Copy `request.snapshot` from the peer into `destination` (opened for writing by the
/// caller), resuming after network failures within `options`' budget, and verify it.
pub async fn pull_snapshot(
    tls: &PeerTls,
    request: &PullRequest,
    destination: &File,
    options: &PullOptions,
) -> Result<Pulled, PullError> {
    let started = Instant::now();
    tracing::info!(
        snapshot = %request.snapshot, peer = %request.peer_node, address = %request.peer_address,
        size = request.expected_size, "pulling a snapshot from a peer"
    );
    let dest = destination
        .try_clone()
        .map(Arc::new)
        .map_err(|source| PullError::Destination { offset: 0, source })?;
    let mut pull = Pull {
        tls,
        request,
        options,
        dest,
        advertised: None,
        durable: 0,
        milestones: Milestones::new(request.expected_size, 0),
    };
    let result = pull.run(started).await;
    let seconds = started.elapsed().as_secs_f64();
    match &result {
        Ok(done) => {
            options.metrics.pull_done(Code::Ok);
            tracing::info!(
                snapshot = %request.snapshot, peer = %request.peer_node, size = done.size,
                attempts = done.attempts, seconds, sha256 = %hex(&done.sha256),
                "pulled and verified a snapshot"
            );
        }
        Err(e) => {
            options.metrics.pull_done(e.code());
            tracing::warn!(
                snapshot = %request.snapshot, peer = %request.peer_node, seconds,
                "pulling a snapshot failed: {e}"
            );
        }
    }
    result
}

struct Pull<'a> {
    tls: &'a PeerTls,
    request: &'a PullRequest,
    options: &'a PullOptions,
    dest: Arc<File>,
    /// What the first attempt's header said; every later one must say the same.
    advertised: Option<Advertised>,
    /// Everything before this offset is written and synced.
    durable: u64,
    milestones: Milestones,
}

impl Pull<'_> {
    async fn run(&mut self, started: Instant) -> Result<Pulled, PullError> {
        let deadline = tokio::time::Instant::now() + self.options.deadline;
        let mut backoff = self.options.initial_backoff;
        let mut attempts = 0u32;
        let mut fruitless = 0u32;
        let mut resumed_from = Vec::new();
        loop {
            attempts += 1;
            if attempts > 1 {
                resumed_from.push(self.durable);
            }
            let before = self.durable;
            let why = match tokio::time::timeout_at(deadline, self.attempt()).await {
                Ok(Ok(sha256)) => {
                    return Ok(Pulled {
                        size: self.request.expected_size,
                        sha256,
                        attempts,
                        resumed_from,
                    })
                }
                Ok(Err(Failure::Fatal(e))) => return Err(e),
                Ok(Err(Failure::Transient(why))) => why,
                Err(_) => "the deadline passed".to_owned(),
            };
            if self.durable > before {
                fruitless = 0;
                backoff = self.options.initial_backoff;
            } else {
                fruitless += 1;
            }
            let wake = tokio::time::Instant::now() + backoff;
            if fruitless >= self.options.max_attempts || wake >= deadline {
                return Err(PullError::GaveUp {
                    attempts,
                    elapsed: started.elapsed(),
                    durable: self.durable,
                    size: self.request.expected_size,
                    last: why,
                });
            }
            tracing::warn!(
                snapshot = %self.request.snapshot, peer = %self.request.peer_node,
                durable = self.durable, attempt = attempts, ?backoff,
                "snapshot pull interrupted, resuming: {why}"
            );
            tokio::time::sleep_until(wake).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        }
    }

    async fn connect(&self) -> Result<Channel, Failure> {
        let config = |e: tonic::transport::Error| Failure::Fatal(PullError::Config(e.to_string()));
        let endpoint = Endpoint::from_shared(format!("https://{}", self.request.peer_address))
            .map_err(config)?
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .tls_config(self.tls.client_config(&self.request.peer_node))
            .map_err(config)?;
        endpoint.connect().await.map_err(from_transport)
    }

    /// One stream from the durable offset to the end; on success, the verified hash.
    async fn attempt(&mut self) -> Result<Sha256, Failure> {
        let mut client = PeerClient::new(self.connect().await?);
        let from = self.durable;
        let mut stream = client
            .read_snapshot(ReadSnapshotRequest {
                snapshot_id: self.request.snapshot.to_string(),
                offset: from,
                claim_namespace: self.request.claim_namespace.clone(),
                claim_name: self.request.claim_name.clone(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let stall = self.options.stall_timeout;
        let mut next_message = async || -> Result<Option<Part>, Failure> {
            match tokio::time::timeout(stall, stream.message()).await {
                Err(_) => Err(Failure::Transient(format!(
                    "nothing received for {stall:?}"
                ))),
                Ok(Err(status)) => Err(from_status(status)),
                Ok(Ok(None)) => Ok(None),
                Ok(Ok(Some(SnapshotChunk { part: None }))) => {
                    Err(PullError::Protocol("an empty message".to_owned()).into())
                }
                Ok(Ok(Some(SnapshotChunk { part: Some(part) }))) => Ok(Some(part)),
            }
        };
        let Some(Part::Header(header)) = next_message().await? else {
            return Err(
                PullError::Protocol("the stream did not start with its header".into()).into(),
            );
        };
        let advertised = check_header(
            &header,
            self.request.expected_size,
            self.advertised.as_ref(),
        )?;
        let size = advertised.size;
        self.advertised = Some(advertised.clone());
        let mut chunks = Chunks::new(from, size);
        while let Some(part) = next_message().await? {
            let Part::Data(chunk) = part else {
                return Err(PullError::Protocol("a second header".to_owned()).into());
            };
            chunks.accept(chunk.offset, chunk.data.len())?;
            self.write(chunk.offset, chunk.data).await?;
            let written = chunks.next();
            self.options.progress.store(written, Ordering::Relaxed);
            if let Some(percent) = self.milestones.passed(written) {
                let snapshot = &self.request.snapshot;
                tracing::info!(%snapshot, written, size, "pulled {percent}%");
            }
            if written - self.durable >= self.options.sync_every {
                self.sync(written).await?;
            }
        }
        chunks.finish()?;
        self.sync(size).await?;
        self.verify(&advertised).await?;
        Ok(advertised.sha256)
    }

    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), Failure> {
        let dest = self.dest.clone();
        let len = data.len() as u64;
        let at = self.options.destination_offset + offset;
        blocking(offset, move || dest.write_all_at(&data, at)).await?;
        self.options.metrics.pulled(len);
        Ok(())
    }

    /// fdatasync, then everything before `upto` survives a crash of this node. The synced
    /// pages are dropped from the cache: a restore does not evict the node's working set, and
    /// the final verification reads the device, not what is still in memory.
    async fn sync(&mut self, upto: u64) -> Result<(), Failure> {
        let dest = self.dest.clone();
        let from = self.durable;
        let base = self.options.destination_offset;
        blocking(upto, move || {
            dest.sync_data()?;
            drop_cached(&dest, base + from, base + upto);
            Ok(())
        })
        .await?;
        self.durable = upto;
        Ok(())
    }

    /// Read the destination back, so what a pod gets is what the peer hashed.
    async fn verify(&self, advertised: &Advertised) -> Result<(), Failure> {
        let dest = self.dest.clone();
        let size = advertised.size;
        let base = self.options.destination_offset;
        let actual = blocking(0, move || sha256_of(&dest, base, size)).await?;
        if actual != advertised.sha256 {
            return Err(PullError::Mismatch {
                expected: hex(&advertised.sha256),
                actual: hex(&actual),
            }
            .into());
        }
        Ok(())
    }
}

/// Best effort: a cache that keeps the pages only costs memory and a weaker verification.
fn drop_cached(file: &File, from: u64, upto: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(upto - from)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        file,
        offset,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Destination I/O off the runtime; a failure names the offset it happened at.
async fn blocking<T: Send + 'static>(
    offset: u64,
    io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Failure> {
    let failed = |source| Failure::Fatal(PullError::Destination { offset, source });
    tokio::task::spawn_blocking(io)
        .await
        .map_err(|e| failed(std::io::Error::other(e)))?
        .map_err(failed)
}
