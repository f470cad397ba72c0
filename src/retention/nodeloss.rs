//! Facts about nodes and node-pinned volumes used to decide that a pod's volume is lost.
//!
//! A Kennel volume lives on one node: csi-provisioner pins its PV there with a required node
//! affinity on [`TOPOLOGY_KEY`], whose value is the Kubernetes node name. The volume is lost when
//! that node is confirmed gone (an uncached GET answered 404) or when a node of that name exists
//! but is another machine than the one that created the volume ([`MACHINE_ID_ATTRIBUTE`] vs
//! `status.nodeInfo.machineID`). A node that is merely NotReady, or missing only from the watch
//! cache, is not lost.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use k8s_openapi::jiff::Timestamp;

/// Topology key the Kennel driver reports; its value is the node name.
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";
/// Volume attribute where the driver records the machine ID of the node that made the volume.
pub const MACHINE_ID_ATTRIBUTE: &str = "kennel.csi.dev/machine-id";

/// What the controller knows about nodes: the cached ones, plus the names an uncached GET
/// confirmed absent (404).
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    machine_ids: BTreeMap<String, Option<String>>,
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

    /// Records a node that exists (from the cache or from a GET).
    pub fn insert(&mut self, node: &Node) {
        if let Some(name) = node.metadata.name.clone() {
            let machine_id = node
                .status
                .as_ref()
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.machine_id.clone())
                .filter(|m| !m.is_empty());
            self.confirmed_gone.remove(&name);
            self.machine_ids.insert(name, machine_id);
        }
    }

    /// Records that an uncached GET for `name` returned 404.
    pub fn confirm_gone(&mut self, name: &str) {
        if !self.machine_ids.contains_key(name) {
            self.confirmed_gone.insert(name.to_string());
        }
    }
}

/// Whether the node a volume is pinned to still holds that volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeVerdict {
    /// The node exists and is (as far as we can tell) the machine that made the volume.
    Present,
    /// Missing from the cache but not confirmed by a GET yet.
    Unconfirmed,
    /// A GET confirmed the node object is gone.
    Deleted,
    /// A node of that name exists but is another machine.
    Replaced { recorded: String, current: String },
}

impl NodeVerdict {
    pub fn is_lost(&self) -> bool {
        matches!(self, NodeVerdict::Deleted | NodeVerdict::Replaced { .. })
    }
}

/// The node a Kennel PV is pinned to, if its affinity names exactly one.
pub fn pinned_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let mut names = BTreeSet::new();
    for term in terms {
        for expr in term.match_expressions.iter().flatten() {
            if expr.key == TOPOLOGY_KEY && expr.operator == "In" {
                names.extend(expr.values.iter().flatten().cloned());
            }
        }
    }
    let mut names = names.into_iter();
    match (names.next(), names.next()) {
        (Some(name), None) => Some(name),
        _ => None,
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
        .map(String::as_str)
        .filter(|m| !m.is_empty())
}

/// Judges the node `pv` is pinned to (`node`) against the view.
pub fn verdict(pv: &PersistentVolume, node: &str, view: &NodeView) -> NodeVerdict {
    match view.machine_ids.get(node) {
        Some(current) => match (recorded_machine_id(pv), current) {
            (Some(recorded), Some(current)) if recorded != current => NodeVerdict::Replaced {
                recorded: recorded.to_string(),
                current: current.clone(),
            },
            // Unknown on either side: we cannot tell, so the node keeps its volumes.
            _ => NodeVerdict::Present,
        },
        None if view.confirmed_gone.contains(node) => NodeVerdict::Deleted,
        None => NodeVerdict::Unconfirmed,
    }
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
