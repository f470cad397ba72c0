//! gRPC glue: protobuf in, domain calls, protobuf out. Nothing below knows protobuf.

pub mod change_log;
pub mod client;
pub mod controller_service;
pub mod convert;
pub mod driver_metrics;
pub mod expansion;
pub mod group_controller_service;
pub mod identity_service;
pub mod node_service;
pub mod peer_link;
pub mod placement;
pub mod server;
pub mod snapshot_handle;
pub mod status;

/// Code generated from proto/csi.proto.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}
