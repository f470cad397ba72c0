//! Pulls under way on this node, as people see them. The driver publishes the list in its
//! peer Lease every few seconds (`cluster::publish_transfers`); `kennel ctl where` reads it
//! from there, so one command shows every node's transfers without reaching any node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The annotation of a node's peer Lease that lists its pulls under way, as JSON.
pub const TRANSFERS_ANNOTATION: &str = "kennel.csi.dev/transfers";

/// One pull, at the moment it was looked at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferStatus {
    /// `<namespace>/<name>` of the claim being restored.
    pub claim: String,
    pub snapshot: String,
    /// The node the bytes come from.
    pub from: String,
    /// Bytes written so far (back to the last synced offset after a resume).
    pub done: u64,
    pub total: u64,
    /// When the pull began, RFC 3339.
    pub since: String,
}

struct Running {
    status: TransferStatus,
    progress: Arc<AtomicU64>,
}

/// The registry of this node's pulls.
#[derive(Clone, Default)]
pub struct Transfers {
    running: Arc<Mutex<BTreeMap<u64, Running>>>,
    next: Arc<AtomicU64>,
}

/// A registered pull; dropping it (the pull ended, however) removes it.
pub struct TransferGuard {
    transfers: Transfers,
    id: u64,
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        self.transfers.lock().remove(&self.id);
    }
}

impl Transfers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a pull whose written bytes `progress` counts.
    pub fn begin(&self, status: TransferStatus, progress: Arc<AtomicU64>) -> TransferGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Running { status, progress });
        TransferGuard {
            transfers: self.clone(),
            id,
        }
    }

    /// Every pull under way, oldest first, with its bytes so far.
    pub fn current(&self) -> Vec<TransferStatus> {
        self.lock()
            .values()
            .map(|r| TransferStatus {
                done: r.progress.load(Ordering::Relaxed).min(r.status.total),
                ..r.status.clone()
            })
            .collect()
    }
}

/// The transfers listed in a Lease annotation; anything unreadable lists none.
pub fn parse(annotation: &str) -> Vec<TransferStatus> {
    serde_json::from_str(annotation).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(claim: &str) -> TransferStatus {
        TransferStatus {
            claim: claim.into(),
            snapshot: "ks-1".into(),
            from: "node-a".into(),
            done: 0,
            total: 100,
            since: "2026-12-03T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_pull_is_listed_with_its_progress_until_it_ends() {
        let transfers = Transfers::default();
        let progress = Arc::new(AtomicU64::new(0));
        let first = transfers.begin(status("ns/a"), progress.clone());
        let second = transfers.begin(status("ns/b"), Arc::new(AtomicU64::new(0)));
        progress.store(40, Ordering::Relaxed);
        let now = transfers.current();
        assert_eq!(now.len(), 2);
        assert_eq!((now[0].claim.as_str(), now[0].done), ("ns/a", 40));
        progress.store(1000, Ordering::Relaxed);
        assert_eq!(transfers.current()[0].done, 100, "never past the total");
        drop(first);
        assert_eq!(transfers.current(), vec![status("ns/b")]);
        drop(second);
        assert!(transfers.current().is_empty());
    }

    #[test]
    fn the_annotation_round_trips_and_garbage_lists_nothing() {
        let list = vec![status("ns/a")];
        let text = serde_json::to_string(&list).unwrap();
        assert_eq!(parse(&text), list);
        assert!(parse("not json").is_empty());
    }
}
