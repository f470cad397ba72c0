//! Counting and timing CSI calls: the `kennel_csi_rpc*` families, by RPC name and status code,
//! and which calls change what the backend holds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::metrics_endpoint::LATENCY_BUCKETS;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    rpc: String,
    code: String,
}

/// Counts and latencies of CSI calls, by RPC name and status code.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    calls: Family<RpcLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<RpcLabels, Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics {
            calls: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BUCKETS.iter().copied())
            }),
        }
    }
}

/// `/csi.v1.Controller/CreateVolume` → `CreateVolume`.
pub fn rpc_name(path: &str) -> &str {
    path.rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
}

/// The name Prometheus users expect for a status code (`NotFound`, `ResourceExhausted`...).
pub fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// Calls after which the backend's volumes or pool may differ.
pub fn changes_state(rpc: &str) -> bool {
    matches!(
        rpc,
        "CreateVolume"
            | "DeleteVolume"
            | "ControllerExpandVolume"
            | "ControllerModifyVolume"
            | "NodeExpandVolume"
            | "CreateSnapshot"
            | "DeleteSnapshot"
            | "CreateVolumeGroupSnapshot"
            | "DeleteVolumeGroupSnapshot"
    )
}

impl RpcMetrics {
    pub fn record(&self, rpc: &str, code: Code, seconds: f64) {
        let labels = RpcLabels {
            rpc: rpc.to_owned(),
        };
        self.calls.get_or_create(&labels).inc();
        if code != Code::Ok {
            self.errors
                .get_or_create(&ErrorLabels {
                    rpc: rpc.to_owned(),
                    code: code_name(code),
                })
                .inc();
        }
        self.latency.get_or_create(&labels).observe(seconds);
    }

    pub fn calls(&self, rpc: &str) -> u64 {
        self.calls
            .get_or_create(&RpcLabels {
                rpc: rpc.to_owned(),
            })
            .get()
    }

    pub fn errors(&self, rpc: &str, code: Code) -> u64 {
        self.errors
            .get_or_create(&ErrorLabels {
                rpc: rpc.to_owned(),
                code: code_name(code),
            })
            .get()
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "kennel_csi_rpc",
            "CSI calls handled, by RPC",
            self.calls.clone(),
        );
        registry.register(
            "kennel_csi_rpc_errors",
            "CSI calls that failed, by RPC and gRPC status code",
            self.errors.clone(),
        );
        registry.register(
            "kennel_csi_rpc_duration_seconds",
            "Time to answer a CSI call, by RPC",
            self.latency.clone(),
        );
    }
}
