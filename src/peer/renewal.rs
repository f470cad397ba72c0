//! Certificates renewed while the driver runs. A node certificate lives
//! `pki::NODE_VALIDITY`; long before it ends a new one is issued, the pulls started from then
//! on present it, and a new generation of the server starts accepting with it on the same
//! socket before the old generation stops accepting. The old one finishes the streams it
//! serves (a graceful shutdown), so a renewal never cuts a transfer.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;

use super::server::{serve, Grants, PeerService, SnapshotSource};
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
    let retry = renew_every.min(Duration::from_secs(60));
    let mut stop_old: Option<oneshot::Sender<()>> = None;
    loop {
        let socket = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (current, generation) = (tls.get(), service.clone());
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = serve(socket, &current, generation, shutdown).await {
                tracing::error!(error = %e, "the peer channel stopped");
            }
        });
        // The new generation accepts before the old one stops: no connection is refused.
        if let Some(old) = stop_old.replace(stop) {
            let _ = old.send(());
        }
        let mut wait = renew_every;
        loop {
            tokio::time::sleep(wait).await;
            match renew().await {
                Ok(next) => {
                    tracing::info!(node = %next.node(), "renewed the peer certificate");
                    tls.set(next);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?retry, "could not renew the peer certificate");
                    wait = retry;
                }
            }
        }
    }
}
