//! The retention controller's counters and gauges, served on `--metrics-addr` through the
//! shared endpoint in `crate::metrics_endpoint`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics_endpoint::Exporter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    /// Writes done, by kind (`claim_owners`, `claim_delete`, ...).
    actions: Family<KindLabel, Counter>,
    /// Reconcile failures, by error label.
    failures: Family<ErrorLabel, Counter>,
    /// Volumes in a node's backend with no PV.
    pub orphan_volumes: Gauge,
    /// Kennel PVs whose volume is not in their node's backend.
    pub missing_volumes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let actions = Family::<KindLabel, Counter>::default();
        let failures = Family::<ErrorLabel, Counter>::default();
        let orphan_volumes = Gauge::default();
        let missing_volumes = Gauge::default();
        let mut registry = Registry::default();
        registry.register(
            "kennel_retention_reconciles",
            "StatefulSets planned",
            reconciles.clone(),
        );
        registry.register(
            "kennel_retention_actions",
            "Writes done, by kind",
            actions.clone(),
        );
        registry.register(
            "kennel_retention_failures",
            "Reconcile failures, by error",
            failures.clone(),
        );
        registry.register(
            "kennel_retention_orphan_volumes",
            "Volumes in a node's backend with no PV",
            orphan_volumes.clone(),
        );
        registry.register(
            "kennel_retention_missing_volumes",
            "Kennel PVs whose volume is not in their node's backend",
            missing_volumes.clone(),
        );
        Metrics {
            registry,
            reconciles,
            actions,
            failures,
            orphan_volumes,
            missing_volumes,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    pub fn action(&self, kind: &'static str) {
        self.actions.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn failure(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabel { error }).inc();
    }

    pub fn action_count(&self, kind: &'static str) -> u64 {
        self.actions.get_or_create(&KindLabel { kind }).get()
    }

    /// The OpenMetrics text `/metrics` serves.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `/metrics`, `/healthz` and `/readyz` of `kennel retention` (see [`crate::metrics_endpoint::serve`]).
/// A standby replica waiting for the Lease is ready too: it is doing its job.
impl Exporter for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.reconciled();
        m.action("claim_owners");
        m.action("claim_owners");
        m.failure("conflict");
        m.orphan_volumes.set(3);
        let text = m.render();
        assert!(
            text.contains("kennel_retention_reconciles_total 1\n"),
            "{text}"
        );
        assert!(text.contains("kennel_retention_actions_total{kind=\"claim_owners\"} 2\n"));
        assert!(text.contains("kennel_retention_failures_total{error=\"conflict\"} 1\n"));
        assert!(text.contains("kennel_retention_orphan_volumes 3\n"));
        assert!(text.contains("kennel_retention_missing_volumes 0\n"));
    }
}
