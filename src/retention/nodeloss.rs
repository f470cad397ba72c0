//! Facts about nodes, and the rule that decides a node-local volume is lost with its node.
//!
//! A Kennel volume lives on one node: csi-provisioner pins its PV there with a required node
//! affinity on [`TOPOLOGY_KEY`], whose value is the Kubernetes node name. Deleting a claim
//! deletes its data, so the volume counts as lost only on evidence that the node and its disk
//! are gone:
//! - the Node object is deleted (an uncached GET answered 404), or
//! - the node has been NotReady for longer than the grace period **and** Kennel's driver is no
//!   longer registered in the node's CSINode (also an uncached GET).
//!
//! Nothing else is evidence. A Ready node is never lost, whatever else is true (cordoned,
//! tainted, a pod that cannot be scheduled there, another machine ID). A machine ID different
//! from the one recorded when the volume was made is reported, never acted on; an unknown ID on
//! either side means "cannot tell".

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use k8s_openapi::api::storage::v1::CSINode;
use k8s_openapi::jiff::Timestamp;

/// Topology key the Kennel driver reports; its value is the node name.
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";
/// Volume attribute where the driver records the identity of the host that made the volume.
pub const MACHINE_ID_ATTRIBUTE: &str = "kennel.csi.dev/machine-id";
/// What drivers before host identity was required recorded when they could not read one.
const LEGACY_UNKNOWN_ID: &str = "unknown";

/// What the cache (or an uncached GET) says about one existing node.
#[derive(Clone, Debug, Default)]
struct NodeFacts {
    machine_id: Option<String>,
    /// When the Ready condition turned False or Unknown; `None` while Ready or when the node
    /// reports no readiness at all (cannot tell, so never lost).
    not_ready_since: Option<Timestamp>,
}

/// What the controller knows about nodes: the cached ones, the names an uncached GET confirmed
/// absent (404), and the CSINodes read uncached.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    nodes: BTreeMap<String, NodeFacts>,
    confirmed_gone: BTreeSet<String>,
    /// Node name → whether Kennel's driver is registered in its CSINode.
    driver_registered: BTreeMap<String, bool>,
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
        let Some(name) = node.metadata.name.clone() else {
            return;
        };
        let status = node.status.as_ref();
        let machine_id = status
            .and_then(|s| s.node_info.as_ref())
            .and_then(|i| known_identity(&i.machine_id))
            .map(str::to_owned);
        let not_ready_since = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .filter(|c| c.status != "True")
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0);
        self.confirmed_gone.remove(&name);
        self.nodes.insert(
            name,
            NodeFacts {
                machine_id,
                not_ready_since,
            },
        );
    }

    /// Records that an uncached GET for `name` returned 404.
    pub fn confirm_gone(&mut self, name: &str) {
        if !self.nodes.contains_key(name) {
            self.confirmed_gone.insert(name.to_string());
        }
    }

    /// Records an uncached read of `name`'s CSINode (`None`: it does not exist).
    pub fn record_csinode(&mut self, name: &str, csinode: Option<&CSINode>, driver: &str) {
        let registered = csinode
            .and_then(|c| c.spec.drivers.iter().find(|d| d.name == driver))
            .is_some();
        self.driver_registered.insert(name.to_string(), registered);
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
    /// The node exists and nothing shows its disk is gone.
    Present,
    /// NotReady, but not for the whole grace period yet: look again after `remaining`.
    NotReady { remaining: Duration },
    /// Missing from the cache: an uncached GET of the Node must confirm it.
    Unconfirmed,
    /// NotReady past the grace period: an uncached GET of its CSINode must tell whether
    /// Kennel's driver is still registered there.
    DriverUnconfirmed,
    /// A GET confirmed the Node object is gone.
    Deleted,
    /// NotReady since `since`, past the grace period, and Kennel's driver is gone from its
    /// CSINode.
    Abandoned { since: Timestamp },
}

impl NodeVerdict {
    pub fn is_lost(&self) -> bool {
        matches!(self, NodeVerdict::Deleted | NodeVerdict::Abandoned { .. })
    }

    /// The evidence, for events and logs.
    pub fn evidence(&self) -> String {
        match self {
            NodeVerdict::Deleted => "its Node object is deleted".to_owned(),
            NodeVerdict::Abandoned { since } => format!(
                "it has been NotReady since {since} and Kennel's driver is no longer registered in its CSINode"
            ),
            _ => "it is not lost".to_owned(),
        }
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
        .and_then(|m| known_identity(m))
}

/// Judges the node `pv` is pinned to (`node`) against the view, at `now`.
pub fn verdict(node: &str, view: &NodeView, now: Timestamp, grace: Duration) -> NodeVerdict {
    let Some(facts) = view.nodes.get(node) else {
        return if view.confirmed_gone.contains(node) {
            NodeVerdict::Deleted
        } else {
            NodeVerdict::Unconfirmed
        };
    };
    let Some(since) = facts.not_ready_since else {
        return NodeVerdict::Present;
    };
    let waited = Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO);
    if waited < grace {
        return NodeVerdict::NotReady {
            remaining: grace - waited,
        };
    }
    match view.driver_registered.get(node) {
        None => NodeVerdict::DriverUnconfirmed,
        Some(true) => NodeVerdict::Present,
        Some(false) => NodeVerdict::Abandoned { since },
    }
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
