//! Expanding a volume that another node holds.
//!
//! csi-resizer has no node-deployment mode. Every node runs one (the DaemonSet), so they elect
//! one leader, and the leader's driver is asked to expand every Kennel volume, wherever it
//! lives. For a volume pinned to another node it must neither fail (the resizer would report it
//! and retry) nor answer NOT_FOUND (the resizer takes that as final and marks the expansion
//! infeasible). So it asks the holder through the volume's PV — the size in
//! [`EXPAND_TO_ANNOTATION`], each request told apart by [`EXPAND_ASKED_AT_ANNOTATION`] — and
//! answers once the holder reports the volume grown in [`EXPANDED_TO_ANNOTATION`], or with the
//! holder's error from [`EXPAND_FAILED_ANNOTATION`] (retryable: the resizer's next call is a new
//! request, tried again). Each holder watches the PVs pinned to it ([`serve_requests`]) and
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
/// PV annotation: when that request was made (a new value is a new request).
pub const EXPAND_ASKED_AT_ANNOTATION: &str = "kennel.csi.dev/expand-asked-at";
/// PV annotation: the size in bytes the holder grew the volume to.
pub const EXPANDED_TO_ANNOTATION: &str = "kennel.csi.dev/expanded-to";
/// PV annotation: the holder could not grow it, as `{"asked_at": …, "error": …}`.
pub const EXPAND_FAILED_ANNOTATION: &str = "kennel.csi.dev/expand-failed";

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
    /// Ask for `bytes`, as the request made at `asked_at`.
    async fn request_expansion(&self, pv: &str, bytes: u64, asked_at: &str) -> Result<()>;
}

impl Placements for ClusterView {
    async fn volume(&self, handle: &str) -> Result<Option<PlacedVolume>> {
        ClusterView::volume(self, handle).await
    }
    async fn volume_named(&self, pv: &str) -> Result<Option<PlacedVolume>> {
        ClusterView::volume_named(self, pv).await
    }
    async fn request_expansion(&self, pv: &str, bytes: u64, asked_at: &str) -> Result<()> {
        let bytes = bytes.to_string();
        let notes = [
            (EXPAND_TO_ANNOTATION, Some(bytes.as_str())),
            (EXPAND_ASKED_AT_ANNOTATION, Some(asked_at)),
        ];
        self.annotate_volume(pv, &notes).await
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
    let mut asked_at = None;
    loop {
        if let Some(done) = placed.expanded_to.filter(|done| *done >= required) {
            return Ok(done);
        }
        match &asked_at {
            None => {
                // Each call is a request of its own, so a retry is tried again by the holder.
                let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
                cluster.request_expansion(&placed.pv, required, &at).await?;
                tracing::info!(volume_id = id, %holder, required, "asked the volume's node to grow it");
                asked_at = Some(at);
            }
            Some(at) => {
                if let Some((_, error)) = placed.failed.as_ref().filter(|(when, _)| when == at) {
                    return Err(Error::Unavailable(format!(
                        "node {holder} could not grow volume {id} to {required} bytes: {error}"
                    )));
                }
            }
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

/// A request on `pv` this node should act on: the volume handle, the size asked for and the
/// request's time. A request is tried once: answered by a size or by a refusal naming it.
fn pending_request(
    pv: &PersistentVolume,
    driver: &str,
    node: &str,
) -> Option<(String, u64, String)> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    if csi.driver != driver || pinned_node(pv).as_deref() != Some(node) {
        return None;
    }
    let placed = crate::csi::placement::placed(pv);
    let asked = placed.expand_to?;
    let asked_at = placed.asked_at?;
    let grown = placed.expanded_to.is_some_and(|done| done >= asked);
    let refused = placed.failed.is_some_and(|(when, _)| when == asked_at);
    (!grown && !refused).then(|| (csi.volume_handle.clone(), asked, asked_at))
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
        let Some((handle, asked, asked_at)) = pending_request(&pv, &driver.name, &node) else {
            continue;
        };
        let name = pv.metadata.name.clone().unwrap_or_default();
        let range = CapacityRange {
            required: asked,
            limit: 0,
        };
        let answer = match driver.controller.expand(&handle, range).await {
            Ok(size) => {
                tracing::info!(volume_id = %handle, pv = %name, asked, size, "expanded for another node's resizer");
                vec![
                    (EXPANDED_TO_ANNOTATION, Some(size.to_string())),
                    (EXPAND_FAILED_ANNOTATION, None),
                ]
            }
            Err(e) => {
                tracing::warn!(volume_id = %handle, pv = %name, asked, error = %e, "could not expand for another node's resizer");
                let refusal = serde_json::json!({"asked_at": asked_at, "error": e.to_string()});
                vec![(EXPAND_FAILED_ANNOTATION, Some(refusal.to_string()))]
            }
        };
        let notes: Vec<(&str, Option<&str>)> =
            answer.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        if let Err(e) = cluster.annotate_volume(&name, &notes).await {
            tracing::warn!(pv = %name, error = %e, "could not answer an expansion request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A cluster whose holder grows the volume (or refuses) after `answers_after` reads.
    struct Script {
        node: Option<&'static str>,
        answers_after: usize,
        refuses: bool,
        reads: Mutex<usize>,
        asked: Mutex<Vec<(u64, String)>>,
    }

    impl Script {
        fn pv(&self) -> PlacedVolume {
            let mut reads = self.reads.lock().unwrap();
            *reads += 1;
            let last = self.asked.lock().unwrap().last().cloned();
            let answered = *reads > self.answers_after;
            PlacedVolume {
                pv: "pvc-1".into(),
                node: self.node.map(str::to_owned),
                expand_to: last.as_ref().map(|(b, _)| *b),
                expanded_to: (answered && !self.refuses).then_some(200),
                asked_at: last.as_ref().map(|(_, at)| at.clone()),
                failed: last
                    .filter(|_| answered && self.refuses)
                    .map(|(_, at)| (at, "pool full".to_owned())),
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
        async fn request_expansion(&self, _: &str, bytes: u64, asked_at: &str) -> Result<()> {
            self.asked
                .lock()
                .unwrap()
                .push((bytes, asked_at.to_owned()));
            Ok(())
        }
    }

    fn script(node: Option<&'static str>, answers_after: usize, refuses: bool) -> Script {
        Script {
            node,
            answers_after,
            refuses,
            reads: Mutex::new(0),
            asked: Mutex::new(Vec::new()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn another_nodes_volume_is_asked_for_and_answered_once_grown() {
        let s = script(Some("node-b"), 3, false);
        let size = expand_elsewhere(&s, "node-a", "kv-1", 150, None)
            .await
            .unwrap();
        assert_eq!(size, 200);
        let asked = s.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 1, "one request per call");
        assert_eq!(asked[0].0, 150, "the request is on the PV");
        assert_eq!(*s.reads.lock().unwrap(), 4, "read until grown");
    }

    #[tokio::test(start_paused = true)]
    async fn a_volume_already_grown_is_not_asked_again() {
        let s = script(Some("node-b"), 0, false);
        s.asked.lock().unwrap().push((150, "t0".into()));
        assert_eq!(
            expand_elsewhere(&s, "node-a", "kv-1", 150, None)
                .await
                .unwrap(),
            200
        );
        assert_eq!(s.asked.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_holders_refusal_of_this_request_is_the_answer_and_a_retry_asks_again() {
        let s = script(Some("node-b"), 2, true);
        for attempt in 1..=2 {
            let err = expand_elsewhere(&s, "node-a", "kv-1", 150, None)
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::Unavailable(ref m) if m.contains("pool full") && m.contains("node-b")),
                "{err}"
            );
            assert_eq!(
                s.asked.lock().unwrap().len(),
                attempt,
                "each call is a new request"
            );
            *s.reads.lock().unwrap() = 0;
        }
        let asked = s.asked.lock().unwrap().clone();
        assert_ne!(asked[0].1, asked[1].1, "requests are told apart");
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_never_answers_runs_out_the_callers_deadline() {
        let s = script(Some("node-b"), usize::MAX, false);
        let err = expand_elsewhere(&s, "node-a", "kv-1", 150, Some(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Unavailable(ref m) if m.contains("not grown")),
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
            let s = script(node, 0, false);
            let err = expand_elsewhere(&s, "node-a", id, 150, None)
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::VolumeNotFound(_)),
                "{node:?} {id}: {err}"
            );
            assert!(s.asked.lock().unwrap().is_empty());
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
    fn a_holder_acts_once_on_each_of_its_own_requests() {
        let d = "kennel.csi.dev";
        let pending =
            |notes: &[(&str, &str)]| pending_request(&pv("node-b", d, notes), d, "node-b");
        let asked = [
            (EXPAND_TO_ANNOTATION, "300"),
            (EXPAND_ASKED_AT_ANNOTATION, "t1"),
        ];
        assert_eq!(pending(&asked), Some(("kv-x".into(), 300, "t1".into())));
        assert_eq!(pending_request(&pv("node-a", d, &asked), d, "node-b"), None);
        assert_eq!(
            pending_request(&pv("node-b", "other", &asked), d, "node-b"),
            None
        );
        assert_eq!(pending(&[]), None);
        assert_eq!(
            pending(&[(EXPAND_TO_ANNOTATION, "300")]),
            None,
            "no request time"
        );
        let grown = [asked[0], asked[1], (EXPANDED_TO_ANNOTATION, "304")];
        assert_eq!(pending(&grown), None);
        let bigger = [
            (EXPAND_TO_ANNOTATION, "400"),
            asked[1],
            (EXPANDED_TO_ANNOTATION, "304"),
        ];
        assert_eq!(pending(&bigger), Some(("kv-x".into(), 400, "t1".into())));
        let refused = [
            asked[0],
            asked[1],
            (EXPAND_FAILED_ANNOTATION, r#"{"asked_at":"t1","error":"x"}"#),
        ];
        assert_eq!(
            pending(&refused),
            None,
            "a refused request is not tried again"
        );
        let asked_again = [asked[0], (EXPAND_ASKED_AT_ANNOTATION, "t2"), refused[2]];
        assert_eq!(
            pending(&asked_again),
            Some(("kv-x".into(), 300, "t2".into()))
        );
        let garbage = [(EXPAND_TO_ANNOTATION, "../x"), asked[1]];
        assert_eq!(pending(&garbage), None);
    }
}
