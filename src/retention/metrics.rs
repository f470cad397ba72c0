//! Counters and gauges in the Prometheus text format, served on `--metrics-addr`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    /// Writes done, by kind (`claim_owners`, `claim_delete`, ...).
    actions: Mutex<BTreeMap<&'static str, u64>>,
    /// Reconcile failures, by error label.
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Volumes in a node's backend with no PV.
    pub orphan_volumes: AtomicI64,
    /// Kennel PVs whose volume is not in their node's backend.
    pub missing_volumes: AtomicI64,
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += 1;
    }
}

impl Metrics {
    pub fn reconciled(&self) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
    }

    pub fn action(&self, kind: &'static str) {
        bump(&self.actions, kind);
    }

    pub fn failure(&self, label: &'static str) {
        bump(&self.failures, label);
    }

    pub fn action_count(&self, kind: &str) -> u64 {
        self.actions
            .lock()
            .map(|m| m.get(kind).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE kennel_retention_reconciles_total counter");
        let _ = writeln!(
            out,
            "kennel_retention_reconciles_total {}",
            self.reconciles.load(Ordering::Relaxed)
        );
        for (name, map, label) in [
            ("kennel_retention_actions_total", &self.actions, "kind"),
            ("kennel_retention_failures_total", &self.failures, "error"),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter");
            if let Ok(m) = map.lock() {
                for (k, v) in m.iter() {
                    let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
                }
            }
        }
        for (name, value) in [
            ("kennel_retention_orphan_volumes", &self.orphan_volumes),
            ("kennel_retention_missing_volumes", &self.missing_volumes),
        ] {
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
}

/// Answers every HTTP request on `addr` with the metrics text. Enough for a scraper; no routing.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // The request itself does not matter; read what is there so the client sees a reply.
            let _ = stream.read(&mut buf).await;
            let body = metrics.render();
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.reconciled();
        m.action("claim_owners");
        m.action("claim_owners");
        m.failure("conflict");
        m.orphan_volumes.store(3, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("kennel_retention_reconciles_total 1\n"));
        assert!(text.contains("kennel_retention_actions_total{kind=\"claim_owners\"} 2\n"));
        assert!(text.contains("kennel_retention_failures_total{error=\"conflict\"} 1\n"));
        assert!(text.contains("kennel_retention_orphan_volumes 3\n"));
    }
}
