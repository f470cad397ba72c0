//! What a scrape of `kennel driver` shows: the call families, the build, and gauges encoded from
//! the last observation (a scrape never reads the backend); and readiness from that observation.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::observation::HEALTHY;
use super::telemetry::Telemetry;
use crate::backend::PoolCapacity;
use crate::metrics_endpoint::Exporter;

/// What `/metrics` and `/readyz` of `kennel driver` show.
pub struct DriverExporter {
    registry: Registry,
    telemetry: Arc<Telemetry>,
}

impl DriverExporter {
    pub fn new(telemetry: Arc<Telemetry>, backend_kind: &'static str) -> Self {
        let mut registry = Registry::default();
        telemetry.rpc.register(&mut registry);
        if backend_kind == "lvm" {
            crate::backend::lvm::tool_metrics::register(&mut registry);
        }
        registry.register(
            "kennel_build",
            "Version of the running driver",
            Info::new(vec![
                ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ("backend".to_owned(), backend_kind.to_owned()),
            ]),
        );
        registry.register_collector(Box::new(SnapshotCollector {
            telemetry: telemetry.clone(),
            backend: backend_kind,
        }));
        DriverExporter {
            registry,
            telemetry,
        }
    }

    /// Also export the peer channel's transfers (`--peer-listen`).
    pub fn with_peer(mut self, peer: &crate::peer::PeerMetrics) -> Self {
        peer.register(&mut self.registry);
        self
    }
}

impl Exporter for DriverExporter {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Ready once the backend answered its last observation.
    fn ready(&self) -> Result<(), String> {
        match self.telemetry.observation() {
            None => Err("backend not observed yet".to_owned()),
            Some(o) => o.answer,
        }
    }
}

/// The gauges of the last observation.
struct SnapshotCollector {
    telemetry: Arc<Telemetry>,
    backend: &'static str,
}

impl std::fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

fn gauge_family<'a, V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let backend = self.backend;
        let observed = self.telemetry.observation();
        let up = matches!(&observed, Some(o) if o.answer.is_ok());
        gauge_family(
            &mut encoder,
            "kennel_backend_up",
            "1 when the backend answered the driver's last observation.",
            [(vec![("backend", backend)], i64::from(up))],
        )?;
        let Some(o) = observed else { return Ok(()) };
        let by_class = |pick: fn(&(u64, u64)) -> u64| {
            o.volumes.iter().map(move |(class, v)| {
                (
                    vec![("backend", backend), ("class", class.as_str())],
                    pick(v),
                )
            })
        };
        gauge_family(
            &mut encoder,
            "kennel_volumes",
            "Volumes provisioned on this node, by backend and class.",
            by_class(|v| v.0),
        )?;
        gauge_family(
            &mut encoder,
            "kennel_volume_bytes",
            "Capacity of the volumes provisioned on this node, by backend and class.",
            by_class(|v| v.1),
        )?;
        for (name, help, pick) in [
            (
                "kennel_pool_capacity_bytes",
                "Size of the backend's pool, by device class.",
                (|p: &PoolCapacity| p.total_bytes) as fn(&PoolCapacity) -> u64,
            ),
            (
                "kennel_pool_free_bytes",
                "Room left in the backend's pool for new volumes, by device class.",
                |p| p.available_bytes,
            ),
            (
                "kennel_pool_provisioned_bytes",
                "Bytes promised to existing volumes, by device class.",
                |p| p.provisioned_bytes,
            ),
        ] {
            gauge_family(
                &mut encoder,
                name,
                help,
                o.pools.iter().map(|(class, p)| {
                    (
                        vec![("backend", backend), ("device_class", class.as_str())],
                        pick(p),
                    )
                }),
            )?;
        }
        gauge_family(
            &mut encoder,
            "kennel_volume_condition",
            "1 when a volume's storage is unhealthy (message says why and what to do), else 0.",
            o.conditions.iter().map(|(id, abnormal)| {
                let claim = o.claims.get(id).map_or("", String::as_str);
                let message = abnormal.as_deref().unwrap_or(HEALTHY);
                (
                    vec![
                        ("backend", backend),
                        ("volume_id", id.as_str()),
                        ("claim", claim),
                        ("message", message),
                    ],
                    i64::from(abnormal.is_some()),
                )
            }),
        )?;
        Ok(())
    }
}
