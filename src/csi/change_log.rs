//! One INFO line per state change of a volume or snapshot, for an admin following a pod's
//! storage: what changed, the volume, its claim when known, the paths, and how long it took.
//! Handlers start a [`Change`] once the request is read and call [`Change::done`] on success;
//! failures are logged once by the metrics layer, with their gRPC code.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::model::spec::{PARAM_PVC_NAME, PARAM_PVC_NAMESPACE};

#[must_use = "call done() once the change succeeded"]
pub struct Change {
    event: &'static str,
    started: Instant,
    volume_id: Option<String>,
    snapshot_id: Option<String>,
    claim: Option<String>,
    staging_path: Option<String>,
    target_path: Option<String>,
    bytes: Option<u64>,
}

/// `namespace/name` from the provisioner's metadata (CreateVolume parameters, or the volume
/// context the node calls carry), when present.
pub fn claim_in(map: &BTreeMap<String, String>) -> Option<String> {
    Some(format!(
        "{}/{}",
        map.get(PARAM_PVC_NAMESPACE)?,
        map.get(PARAM_PVC_NAME)?
    ))
}

impl Change {
    pub fn begin(event: &'static str) -> Self {
        Change {
            event,
            started: Instant::now(),
            volume_id: None,
            snapshot_id: None,
            claim: None,
            staging_path: None,
            target_path: None,
            bytes: None,
        }
    }

    pub fn volume(mut self, id: impl ToString) -> Self {
        self.volume_id = Some(id.to_string());
        self
    }

    pub fn snapshot(mut self, id: impl ToString) -> Self {
        self.snapshot_id = Some(id.to_string());
        self
    }

    /// The claim, unless one is already known.
    pub fn claim(mut self, claim: Option<String>) -> Self {
        self.claim = self.claim.or(claim);
        self
    }

    pub fn staging(mut self, path: &Path) -> Self {
        self.staging_path = Some(path.display().to_string());
        self
    }

    pub fn target(mut self, path: &Path) -> Self {
        self.target_path = Some(path.display().to_string());
        self
    }

    pub fn bytes(mut self, bytes: u64) -> Self {
        self.bytes = Some(bytes);
        self
    }

    pub fn done(self) {
        tracing::info!(
            volume_id = self.volume_id.as_deref(),
            snapshot_id = self.snapshot_id.as_deref(),
            claim = self.claim.as_deref(),
            staging_path = self.staging_path.as_deref(),
            target_path = self.target_path.as_deref(),
            bytes = self.bytes,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "{}",
            self.event
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_needs_both_namespace_and_name() {
        let mut map = BTreeMap::from([(PARAM_PVC_NAME.to_owned(), "data-db-0".to_owned())]);
        assert_eq!(claim_in(&map), None);
        map.insert(PARAM_PVC_NAMESPACE.to_owned(), "shop".to_owned());
        assert_eq!(claim_in(&map).as_deref(), Some("shop/data-db-0"));
        let known = Change::begin("x")
            .claim(claim_in(&map))
            .claim(Some("other/c".into()));
        assert_eq!(known.claim.as_deref(), Some("shop/data-db-0"));
    }
}
