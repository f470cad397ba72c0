//! Driver metrics: every gRPC call counted and timed by a tower layer around the tonic server,
//! and volumes and pool space from a snapshot of the backend that a background task refreshes
//! after each call that changes state and on a slow timer. Scrapes only read the snapshot.
//!
//! One room per job: `rpc_counts` counts and times calls, `rpc_layer` wraps the server to feed
//! it, `observation` reads the backend once, `telemetry` keeps the last reading fresh, and
//! `exporter` turns both into what `/metrics` and `/readyz` show.

mod exporter;
mod observation;
mod rpc_counts;
mod rpc_layer;
mod telemetry;

pub use exporter::DriverExporter;
pub use observation::{claim_of, observe, volume_class, Observation, HEALTHY};
pub use rpc_counts::{changes_state, code_name, rpc_name, RpcMetrics};
pub use rpc_layer::{RpcMetricsLayer, RpcMetricsService};
pub use telemetry::{Telemetry, OBSERVE_PERIOD};

/// One log target for every room, the module's own (what `RUST_LOG` directives name).
const LOG_TARGET: &str = module_path!();

#[cfg(test)]
mod tests;
