//! The node-to-node channel: one node's driver reads a snapshot held by another's, to restore
//! it on a node that does not hold it. Mutual TLS with a per-cluster CA authenticates both ends
//! by node name; the serving node checks a grant before it reads a byte.
//!
//! `pki` makes and loads the CA and node certificates, `tls` turns them into tonic settings and
//! names the calling node, `renewal` issues them again while the driver runs, `server` serves snapshots, `client` pulls one into a destination,
//! `cluster` keeps the CA, the grants and the nodes' addresses in the Kubernetes API,
//! `transfers` lists the pulls under way for people.

pub mod client;
pub mod cluster;
pub mod digest;
pub mod metrics;
pub mod name;
pub mod pki;
pub mod renewal;
pub mod server;
pub mod tls;
pub mod transfers;

pub use client::{pull_snapshot, PullError, PullOptions, PullRequest, Pulled};
pub use cluster::{advertise, load_or_create_ca, peer_address, KubeGrants};
pub use metrics::PeerMetrics;
pub use name::NodeName;
pub use pki::{ClusterCa, NodeIdentity};
pub use renewal::{serve_renewing, SharedTls};
pub use server::{serve, Grants, PeerService, SnapshotContent, SnapshotSource};
pub use tls::PeerTls;
pub use transfers::{TransferStatus, Transfers};

/// Code generated from proto/peer.proto.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod pb {
    tonic::include_proto!("kennel.peer.v1");
}
