//! Certificates renewed while the driver runs. A node certificate lives
//! `pki::NODE_VALIDITY`; long before it ends a new one is issued, the pulls started from then
//! on present it, and the connections accepted from then on go to a new generation of the
//! server that presents it. One loop accepts on the socket and hands each connection to the
//! current generation; a retired generation gets no new connection, and those it has run to
//! their end untouched (no GOAWAY), so a renewal never cuts a transfer.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::server::{serve_connections, Grants, PeerService, SnapshotSource};
use super::tls::PeerTls;

/// The identity this node presents now, shared by the server's renewal and the pulls.
#[derive(Clone, Debug)]
pub struct SharedTls(Arc<RwLock<PeerTls>>);

impl SharedTls {
    pub fn new(tls: PeerTls) -> Self {
        SharedTls(Arc::new(RwLock::new(tls)))
    }

    /// The current identity.
    pub fn get(&self) -> PeerTls {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, tls: PeerTls) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }
}

/// Serves `service` on `listener` with `tls`'s identity, and every `renew_every` asks
/// `renew` for a new one (a failure is retried sooner, while the current one still lives).
/// Runs until the process ends.
pub async fn serve_renewing<S, G, F, Fut>(
    listener: std::net::TcpListener,
    tls: SharedTls,
    service: PeerService<S, G>,
    renew_every: Duration,
    mut renew: F,
) -> std::io::Result<()>
where
    S: SnapshotSource + 'static,
    G: Grants + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<PeerTls>>,
{
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let retry = renew_every.min(Duration::from_secs(60));
    // The current generation's inbox of connections; replaced at each renewal.
    let mut inbox = start_generation(&tls, &service);
    let mut renewal = Box::pin(tokio::time::sleep(renew_every));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Err(mpsc::error::SendError(stream)) = inbox.send(Ok(stream)).await {
                        tracing::error!("the peer server generation stopped; starting another");
                        inbox = start_generation(&tls, &service);
                        let _ = inbox.send(stream).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut renewal => match renew().await {
                Ok(next) => {
                    tracing::info!(node = %next.node(), "renewed the peer certificate");
                    tls.set(next);
                    // Dropping the old inbox ends its generation's incoming stream: it takes
                    // no new connection and its own run on.
                    inbox = start_generation(&tls, &service);
                    renewal.as_mut().reset(tokio::time::Instant::now() + renew_every);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?retry, "could not renew the peer certificate");
                    renewal.as_mut().reset(tokio::time::Instant::now() + retry);
                }
            },
        }
    }
}

type Inbox = mpsc::Sender<std::io::Result<tokio::net::TcpStream>>;

/// A server generation presenting `tls`'s current identity, fed through the returned inbox.
fn start_generation<S, G>(tls: &SharedTls, service: &PeerService<S, G>) -> Inbox
where
    S: SnapshotSource + 'static,
    G: Grants + 'static,
{
    let (inbox, connections) = mpsc::channel(16);
    let (current, service) = (tls.get(), service.clone());
    // Runs until its inbox is dropped and its last connection has ended.
    tokio::spawn(async move {
        let incoming = ReceiverStream::new(connections);
        if let Err(e) = serve_connections(incoming, &current, service).await {
            tracing::error!(error = %e, "a peer server generation stopped");
        }
    });
    inbox
}
