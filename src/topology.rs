//! Where a Kennel volume lives, in Kubernetes' terms: the one topology key the driver reports
//! and csi-provisioner pins each PV to. Its value is the Kubernetes node name.

/// Topology key of Kennel volumes; its value is the node name.
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::PersistentVolume;

/// The node a Kennel PV is pinned to, if its required node affinity names exactly one.
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
