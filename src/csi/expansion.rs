//! Expanding a volume that another node holds.
//!
//! csi-resizer has no node-deployment mode. Every node runs one (the DaemonSet), so they elect
//! one leader, and the leader's driver is asked to expand every Kennel volume, wherever it
//! lives. For a volume pinned to another node it must neither fail (the resizer would report it
//! and retry) nor answer NOT_FOUND (the resizer takes that as final and marks the expansion
//! infeasible). So it asks the holder through the volume's PV — the request in
//! [`EXPAND_TO_ANNOTATION`] — and answers once the holder reports the volume grown in
//! [`EXPANDED_TO_ANNOTATION`]. Each holder watches the PVs pinned to it ([`serve_requests`]) and
//! grows its volumes through the same serialized operation as a local ControllerExpandVolume.
//! Only one resizer acts on a claim, so no two write its status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use tokio::time::Instant;

use crate::csi::placement::{ClusterView, PlacedVolume};
use crate::csi::server::Driver;
use crate::error::{Error, Result};
use crate::model::volume_size::CapacityRange;
use crate::topology::pinned_node;

/// PV annotation: the size in bytes a resizer asked for, written by the node that was asked.
pub const EXPAND_TO_ANNOTATION: &str = "kennel.csi.dev/expand-to";
/// PV annotation: the size in bytes the holder grew the volume to.
pub const EXPANDED_TO_ANNOTATION: &str = "kennel.csi.dev/expanded-to";

/// How often the PV is read again while its holder grows it.
const POLL: Duration = Duration::from_millis(500);
/// The wait when the caller set no deadline.
const DEFAULT_WAIT: Duration = Duration::from_secs(120);
/// Left of the caller's deadline for the answer to reach it.
const MARGIN: Duration = Duration::from_secs(1);

/// The cluster as the asking side sees it.
pub(crate) trait Placements {
    async fn volume(&self, handle: &str) -> Result<Option<PlacedVolume>>;
    async fn volume_named(&self, pv: &str) -> Result<Option<PlacedVolume>>;
    async fn request_expansion(&self, pv: &str, bytes: u64) -> Result<()>;
}

impl Placements for ClusterView {
    async fn volume(&self, handle: &str) -> Result<Option<PlacedVolume>> {
        ClusterView::volume(self, handle).await
    }
    async fn volume_named(&self, pv: &str) -> Result<Option<PlacedVolume>> {
        ClusterView::volume_named(self, pv).await
    }
    async fn request_expansion(&self, pv: &str, bytes: u64) -> Result<()> {
        self.annotate_volume(pv, EXPAND_TO_ANNOTATION, &bytes.to_string())
            .await
    }
}

/// Ask the holder of volume `id` (not `this_node`) to grow it to `required` bytes, and wait
/// until it has; returns the size it reports.
pub(crate) async fn expand_elsewhere(
    cluster: &impl Placements,
    this_node: &str,
    id: &str,
    required: u64,
    deadline: Option<Duration>,
) -> Result<u64> {
    let not_found = || Error::VolumeNotFound(id.to_owned());
    let mut placed = cluster.volume(id).await?.ok_or_else(not_found)?;
    let holder = match placed.node.clone() {
        Some(node) if node != this_node => node,
        // Pinned here (and gone) or pinned nowhere: nothing else will grow it.
        _ => return Err(not_found()),
    };
    let wait = deadline.map_or(DEFAULT_WAIT, |d| d.saturating_sub(MARGIN));
    let until = Instant::now() + wait;
    if placed.expanded_to.is_none_or(|done| done < required)
        && placed.expand_to.is_none_or(|asked| asked < required)
    {
        cluster.request_expansion(&placed.pv, required).await?;
        tracing::info!(volume_id = id, %holder, required, "asked the volume's node to grow it");
    }
    loop {
        if let Some(done) = placed.expanded_to.filter(|done| *done >= required) {
            return Ok(done);
        }
        if Instant::now() + POLL > until {
            return Err(Error::Unavailable(format!(
                "volume {id} is on node {holder}, which has not grown it to {required} bytes yet"
            )));
        }
        tokio::time::sleep(POLL).await;
        placed = cluster
            .volume_named(&placed.pv)
            .await?
            .ok_or_else(not_found)?;
    }
}

/// A request on `pv` this node should act on: the volume handle and the size asked for.
fn pending_request(pv: &PersistentVolume, driver: &str, node: &str) -> Option<(String, u64)> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    if csi.driver != driver || pinned_node(pv).as_deref() != Some(node) {
        return None;
    }
    let placed = crate::csi::placement::placed(pv);
    let asked = placed.expand_to?;
    placed
        .expanded_to
        .is_none_or(|done| done < asked)
        .then(|| (csi.volume_handle.clone(), asked))
}

/// Grow this node's volumes that other nodes were asked to expand, for as long as the driver
/// runs. The watch restarts by itself after API errors.
pub async fn serve_requests(driver: Arc<Driver>, cluster: ClusterView) {
    let node = driver.controller.identity().node_id.clone();
    let stream =
        kube::runtime::watcher(cluster.volumes(), kube::runtime::watcher::Config::default());
    let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::applied_objects(
        kube::runtime::WatchStreamExt::default_backoff(stream)
    ));
    while let Some(event) = stream.next().await {
        let pv = match event {
            Ok(pv) => pv,
            Err(e) => {
                tracing::debug!(error = %e, "watching PersistentVolumes");
                continue;
            }
        };
        let Some((handle, asked)) = pending_request(&pv, &driver.name, &node) else {
            continue;
        };
        let name = pv.metadata.name.clone().unwrap_or_default();
        let range = CapacityRange {
            required: asked,
            limit: 0,
        };
        match driver.controller.expand(&handle, range).await {
            Ok(size) => {
                tracing::info!(volume_id = %handle, pv = %name, asked, size, "expanded for another node's resizer");
                if let Err(e) = cluster
                    .annotate_volume(&name, EXPANDED_TO_ANNOTATION, &size.to_string())
                    .await
                {
                    tracing::warn!(pv = %name, error = %e, "could not report an expansion");
                }
            }
            Err(e) => {
                tracing::warn!(volume_id = %handle, pv = %name, asked, error = %e, "could not expand for another node's resizer")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A cluster whose holder reports the volume grown after `grows_after` reads.
    struct Script {
        node: Option<&'static str>,
        grows_after: usize,
        reads: Mutex<usize>,
        asked: Mutex<Option<u64>>,
    }

    impl Script {
        fn pv(&self) -> PlacedVolume {
            let mut reads = self.reads.lock().unwrap();
            *reads += 1;
            PlacedVolume {
                pv: "pvc-1".into(),
                node: self.node.map(str::to_owned),
                expand_to: *self.asked.lock().unwrap(),
                expanded_to: (*reads > self.grows_after).then_some(200),
            }
        }
    }

    impl Placements for Script {
        async fn volume(&self, handle: &str) -> Result<Option<PlacedVolume>> {
            Ok((handle == "kv-1").then(|| self.pv()))
        }
        async fn volume_named(&self, _: &str) -> Result<Option<PlacedVolume>> {
            Ok(Some(self.pv()))
        }
        async fn request_expansion(&self, _: &str, bytes: u64) -> Result<()> {
            *self.asked.lock().unwrap() = Some(bytes);
            Ok(())
        }
    }

    fn script(node: Option<&'static str>, grows_after: usize) -> Script {
        Script {
            node,
            grows_after,
            reads: Mutex::new(0),
            asked: Mutex::new(None),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn another_nodes_volume_is_asked_for_and_answered_once_grown() {
        let s = script(Some("node-b"), 3);
        let size = expand_elsewhere(&s, "node-a", "kv-1", 150, None)
            .await
            .unwrap();
        assert_eq!(size, 200);
        assert_eq!(
            *s.asked.lock().unwrap(),
            Some(150),
            "the request is on the PV"
        );
        assert_eq!(*s.reads.lock().unwrap(), 4, "read until grown");
    }

    #[tokio::test(start_paused = true)]
    async fn a_volume_already_grown_is_not_asked_again() {
        let s = script(Some("node-b"), 0);
        assert_eq!(
            expand_elsewhere(&s, "node-a", "kv-1", 150, None)
                .await
                .unwrap(),
            200
        );
        assert_eq!(*s.asked.lock().unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_never_grows_it_runs_out_the_callers_deadline() {
        let s = script(Some("node-b"), usize::MAX);
        let err = expand_elsewhere(&s, "node-a", "kv-1", 150, Some(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Unavailable(ref m) if m.contains("node-b")),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn volumes_not_placed_elsewhere_are_not_found() {
        for (node, id) in [
            (Some("node-a"), "kv-1"),
            (None, "kv-1"),
            (Some("node-b"), "kv-2"),
        ] {
            let s = script(node, 0);
            let err = expand_elsewhere(&s, "node-a", id, 150, None)
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::VolumeNotFound(_)),
                "{node:?} {id}: {err}"
            );
            assert_eq!(*s.asked.lock().unwrap(), None);
        }
    }

    fn pv(node: &str, driver: &str, notes: &[(&str, &str)]) -> PersistentVolume {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-1", "annotations": notes.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {
                "csi": {"driver": driver, "volumeHandle": "kv-x"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": crate::topology::TOPOLOGY_KEY, "operator": "In", "values": [node]}
                ]}]}},
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_holder_acts_only_on_its_own_unanswered_requests() {
        let d = "kennel.csi.dev";
        let asked = [(EXPAND_TO_ANNOTATION, "300")];
        assert_eq!(
            pending_request(&pv("node-b", d, &asked), d, "node-b"),
            Some(("kv-x".into(), 300))
        );
        assert_eq!(pending_request(&pv("node-a", d, &asked), d, "node-b"), None);
        assert_eq!(
            pending_request(&pv("node-b", "other", &asked), d, "node-b"),
            None
        );
        assert_eq!(pending_request(&pv("node-b", d, &[]), d, "node-b"), None);
        let answered = [
            (EXPAND_TO_ANNOTATION, "300"),
            (EXPANDED_TO_ANNOTATION, "304"),
        ];
        assert_eq!(
            pending_request(&pv("node-b", d, &answered), d, "node-b"),
            None
        );
        let asked_again = [
            (EXPAND_TO_ANNOTATION, "400"),
            (EXPANDED_TO_ANNOTATION, "304"),
        ];
        assert_eq!(
            pending_request(&pv("node-b", d, &asked_again), d, "node-b"),
            Some(("kv-x".into(), 400))
        );
        let garbage = [(EXPAND_TO_ANNOTATION, "../x")];
        assert_eq!(
            pending_request(&pv("node-b", d, &garbage), d, "node-b"),
            None
        );
    }
}
