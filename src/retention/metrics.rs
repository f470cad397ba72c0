//! The retention controller's counters and gauges, served on `--metrics-addr` through the
//! shared endpoint in `crate::metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::metrics::{header, sample, Exporter};

#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    /// Writes done, by kind (`claim_owners`, `claim_delete`, ...).
    actions: Mutex<BTreeMap<&'static str, u64>>,
    /// Reconcile failures, by error label.
    failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Volumes in a node's backend with no PV.
    pub orphan_volumes: AtomicI64,
    /// Kennel PVs whose volume is not in their node's backend.
    pub missing_volumes: AtomicI64,
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += 1;
    }
}

impl Metrics {
    pub fn reconciled(&self) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
    }

    pub fn action(&self, kind: &'static str) {
        bump(&self.actions, kind);
    }

    pub fn failure(&self, label: &'static str) {
        bump(&self.failures, label);
    }

    pub fn action_count(&self, kind: &str) -> u64 {
        self.actions
            .lock()
            .map(|m| m.get(kind).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "kennel_retention_reconciles_total",
            "counter",
            "StatefulSets planned.",
        );
        sample(
            &mut out,
            "kennel_retention_reconciles_total",
            &[],
            self.reconciles.load(Ordering::Relaxed),
        );
        for (name, help, map, label) in [
            (
                "kennel_retention_actions_total",
                "Writes done, by kind.",
                &self.actions,
                "kind",
            ),
            (
                "kennel_retention_failures_total",
                "Reconcile failures, by error.",
                &self.failures,
                "error",
            ),
        ] {
            header(&mut out, name, "counter", help);
            if let Ok(m) = map.lock() {
                for (k, v) in m.iter() {
                    sample(&mut out, name, &[(label, k)], v);
                }
            }
        }
        for (name, help, value) in [
            (
                "kennel_retention_orphan_volumes",
                "Volumes in a node's backend with no PV.",
                &self.orphan_volumes,
            ),
            (
                "kennel_retention_missing_volumes",
                "Kennel PVs whose volume is not in their node's backend.",
                &self.missing_volumes,
            ),
        ] {
            header(&mut out, name, "gauge", help);
            sample(&mut out, name, &[], value.load(Ordering::Relaxed));
        }
        out
    }
}

/// `/metrics`, `/healthz` and `/readyz` of `kennel retention` (see [`crate::metrics::serve`]).
/// A standby replica waiting for the Lease is ready too: it is doing its job.
impl Exporter for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
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
        m.orphan_volumes.store(3, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("kennel_retention_reconciles_total 1\n"));
        assert!(text.contains("kennel_retention_actions_total{kind=\"claim_owners\"} 2\n"));
        assert!(text.contains("kennel_retention_failures_total{error=\"conflict\"} 1\n"));
        assert!(text.contains("kennel_retention_orphan_volumes 3\n"));
    }
}
