//! The channel's Kubernetes glue: who may read a snapshot (the claim being restored, read from
//! the API server), the cluster's CA (kept in a Secret), and where each node's peer server
//! listens (a Lease per node). Everything is read uncached: the calls are rare, and a grant
//! must see the cluster as it is now, not as a watch last saw it.

mod address;
mod ca;
mod grants;
#[cfg(test)]
mod tests;

pub use address::{
    advertise, lease_name, peer_address, publish_transfers, PEER_ADDRESS_ANNOTATION,
};
pub use ca::load_or_create_ca;
pub use grants::{claim_source, ClaimSource, KubeGrants};

/// Where the peer Leases live: the driver's namespace, where the CA Secret is too.
pub const PEER_NAMESPACE: &str = super::pki::CA_SECRET_NAMESPACE;
/// The field manager of the driver's server-side applies.
pub const FIELD_MANAGER: &str = "kennel-peer";

/// What the grant check reads cluster-wide, as RBAC rules (group, resource, verbs): the
/// ClusterRole `kennel-driver` in `deploy/base/node-rbac.yaml` grants these on top of
/// `crate::csi::placement::DRIVER_RULES`.
pub const CLUSTER_RULES: &[(&str, &str, &[&str])] = &[
    ("", "persistentvolumeclaims", &["get"]),
    ("snapshot.storage.k8s.io", "volumesnapshots", &["get"]),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        &["get"],
    ),
];

/// What the CA and the addresses need in [`PEER_NAMESPACE`] (Role `kennel-peer`). `get` on
/// Secrets is limited to the CA's by name; `create` cannot be limited by name in Kubernetes.
/// A server-side apply that creates a Lease needs `create` as well as `patch`.
pub const NAMESPACE_RULES: &[(&str, &str, &[&str])] = &[
    ("", "secrets", &["get", "create"]),
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
];

/// The HTTP status of an API error (`None`: the API server was not reached or not understood).
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
