//! Facts about nodes, and the rule that decides a node-local volume is lost with its node.
//!
//! A Kennel volume lives on one node: csi-provisioner pins its PV there with a required node
//! affinity on [`TOPOLOGY_KEY`], whose value is the Kubernetes node name. Deleting a claim
//! deletes its data, so the volume counts as lost only on Kubernetes' own word that the node is
//! gone, read uncached:
//! - the Node object is deleted (a GET answered 404), or
//! - the node carries the `node.kubernetes.io/out-of-service` taint (non-graceful node
//!   shutdown: an administrator's statement that the node is down and will not come back as
//!   it was).
//!
//! Nothing else is evidence: not NotReady however long, not a driver missing from the node's
//! CSINode (it is, for a moment, whenever the plugin restarts), not a cordon or another
//! machine ID. A machine ID different from the one recorded when the volume was made is
//! reported, never acted on; an unknown ID on either side means "cannot tell".
//!
//! The grace period runs from the moment the evidence was first seen, and that moment is kept
//! in the cluster, on the claim ([`NODE_LOST_ANNOTATION`]): a restarted controller counts from
//! the same instant instead of from memory, and a node that comes back clears it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::node_fit::pod_fits;
use crate::topology::TOPOLOGY_KEY;

/// Volume attribute where the driver records the identity of the host that made the volume.
pub const MACHINE_ID_ATTRIBUTE: &str = "kennel.csi.dev/machine-id";
/// What drivers before host identity was required recorded when they could not read one.
const LEGACY_UNKNOWN_ID: &str = "unknown";
/// The taint that says a node is out of service (Kubernetes' non-graceful node shutdown).
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";
/// Claim annotation: the node a claim's volume is lost with and when that was first seen, as
/// JSON `{"node": …, "since": RFC 3339}`.
pub const NODE_LOST_ANNOTATION: &str = "kennel.csi.dev/node-lost";

/// What the cache (or an uncached GET) says about one existing node.
#[derive(Clone, Debug, Default)]
struct NodeFacts {
    machine_id: Option<String>,
    out_of_service: bool,
    /// Read by an uncached GET in this pass, not from the watch cache.
    fresh: bool,
    /// Cordoned (`spec.unschedulable`), as `kubectl drain` leaves it.
    cordoned: bool,
    /// Ready, not cordoned, no NoSchedule/NoExecute taint, and Kennel's driver registered
    /// (the kubelet labels the node with the driver's topology key): a claim may move here.
    takes_volumes: bool,
    labels: BTreeMap<String, String>,
}

/// What the controller knows about nodes: the cached ones, those read again uncached, and the
/// names an uncached GET confirmed absent (404).
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    nodes: BTreeMap<String, NodeFacts>,
    confirmed_gone: BTreeSet<String>,
}

impl NodeView {
    pub fn from_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        let mut view = Self::default();
        for node in nodes {
            view.insert(node);
        }
        view
    }

    /// Records a node as the watch cache shows it.
    pub fn insert(&mut self, node: &Node) {
        self.record(node, false);
    }

    /// Records a node as an uncached GET returned it: evidence read here may be acted on.
    pub fn insert_fresh(&mut self, node: &Node) {
        self.record(node, true);
    }

    fn record(&mut self, node: &Node, fresh: bool) {
        let Some(name) = node.metadata.name.clone() else {
            return;
        };
        let machine_id = node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .and_then(|i| known_identity(&i.machine_id))
            .map(str::to_owned);
        let out_of_service = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT));
        let cordoned = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| {
                ts.iter()
                    .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            });
        let registered = node
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get(TOPOLOGY_KEY) == Some(&name));
        self.confirmed_gone.remove(&name);
        self.nodes.insert(
            name,
            NodeFacts {
                machine_id,
                out_of_service,
                fresh,
                cordoned,
                takes_volumes: ready && !cordoned && !tainted && registered,
                labels: node.metadata.labels.clone().unwrap_or_default(),
            },
        );
    }

    /// Whether node `name` exists and is cordoned.
    pub fn cordoned(&self, name: &str) -> bool {
        self.nodes.get(name).is_some_and(|f| f.cordoned)
    }

    /// Nodes a volume of `pod` may move to, by name: they take volumes and the pod's
    /// nodeSelector and required node affinity accept them.
    pub fn migration_targets(&self, pod: &Pod) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|(n, f)| f.takes_volumes && pod_fits(pod, n, &f.labels))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Records that an uncached GET for `name` returned 404.
    pub fn confirm_gone(&mut self, name: &str) {
        self.nodes.remove(name);
        self.confirmed_gone.insert(name.to_string());
    }
}

/// An identity that means something: not empty and not the legacy "unknown" placeholder.
pub fn known_identity(id: &str) -> Option<&str> {
    let id = id.trim();
    (!id.is_empty() && id != LEGACY_UNKNOWN_ID).then_some(id)
}

/// Whether the node a volume is pinned to still holds that volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeVerdict {
    /// The node exists and nothing says it is out of service.
    Present,
    /// The cache shows the node missing or out of service: an uncached GET of the Node must
    /// confirm it before anything is decided.
    Unconfirmed,
    /// A GET confirmed the Node object is gone.
    Deleted,
    /// A GET confirmed the node carries the out-of-service taint.
    OutOfService,
}

impl NodeVerdict {
    pub fn is_lost(&self) -> bool {
        matches!(self, NodeVerdict::Deleted | NodeVerdict::OutOfService)
    }

    /// The evidence, for events and logs.
    pub fn evidence(&self) -> String {
        match self {
            NodeVerdict::Deleted => "its Node object is deleted".to_owned(),
            NodeVerdict::OutOfService => format!("it is tainted {OUT_OF_SERVICE_TAINT}"),
            _ => "it is not lost".to_owned(),
        }
    }
}

/// The CSI driver that serves a PV, if it is a CSI volume.
pub fn pv_driver(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.csi.as_ref().map(|c| c.driver.as_str())
}

fn recorded_machine_id(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .csi
        .as_ref()?
        .volume_attributes
        .as_ref()?
        .get(MACHINE_ID_ATTRIBUTE)
        .and_then(|m| known_identity(m))
}

/// Judges the node a volume is pinned to (`node`) against the view.
pub fn verdict(node: &str, view: &NodeView) -> NodeVerdict {
    match view.nodes.get(node) {
        None if view.confirmed_gone.contains(node) => NodeVerdict::Deleted,
        None => NodeVerdict::Unconfirmed,
        Some(facts) if !facts.out_of_service => NodeVerdict::Present,
        Some(facts) if facts.fresh => NodeVerdict::OutOfService,
        Some(_) => NodeVerdict::Unconfirmed,
    }
}

/// When evidence that `claim`'s volume is lost with `node` was first seen, if recorded for
/// that node (a record naming another node is stale).
pub fn loss_recorded(claim: &PersistentVolumeClaim, node: &str) -> Option<Timestamp> {
    let text = claim
        .metadata
        .annotations
        .as_ref()?
        .get(NODE_LOST_ANNOTATION)?;
    let record: serde_json::Value = serde_json::from_str(text).ok()?;
    (record["node"].as_str()? == node)
        .then(|| record["since"].as_str()?.parse().ok())
        .flatten()
}

/// Whether `claim` carries a node-loss record at all.
pub fn has_loss_record(claim: &PersistentVolumeClaim) -> bool {
    claim
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(NODE_LOST_ANNOTATION))
}

/// The annotation value recording that evidence of `node`'s loss was first seen at `since`.
pub fn loss_record(node: &str, since: Timestamp) -> String {
    json!({"node": node, "since": since.to_string()}).to_string()
}

/// The recorded and the current machine ID of `pv`'s node when both are known and differ.
/// Reported to the administrator; never evidence of loss on its own.
pub fn identity_change(
    pv: &PersistentVolume,
    node: &str,
    view: &NodeView,
) -> Option<(String, String)> {
    let recorded = recorded_machine_id(pv)?;
    let current = view.nodes.get(node)?.machine_id.as_deref()?;
    (recorded != current).then(|| (recorded.to_owned(), current.to_owned()))
}

/// When `pod` started waiting for a node, if it is Pending, unscheduled and not being deleted.
///
/// Uses the `PodScheduled=False` condition's transition time, else the creation time.
pub fn unscheduled_since(pod: &Pod) -> Option<Timestamp> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty())
    {
        return None;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase != "Pending" {
        return None;
    }
    let condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        })
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    condition.or_else(|| pod.metadata.creation_timestamp.as_ref().map(|t| t.0))
}
