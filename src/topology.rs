//! Where a Kennel volume lives, in Kubernetes' terms: the one topology key the driver reports
//! and csi-provisioner pins each PV to. Its value is the Kubernetes node name.

/// Topology key of Kennel volumes; its value is the node name.
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";
