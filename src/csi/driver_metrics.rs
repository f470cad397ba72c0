//! Driver metrics: every gRPC call counted and timed by a tower layer around the tonic server,
//! and volumes and pool space from a snapshot of the backend that a background task refreshes
//! after each call that changes state and on a slow timer. Scrapes only read the snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tonic::codegen::http;
use tonic::Code;
use tracing::Instrument as _;

use crate::backend::{Backend, PoolCapacity, VolumeRecord};
use crate::metrics_endpoint::{Exporter, LATENCY_BUCKETS};

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

    fn register(&self, registry: &mut Registry) {
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

/// What the driver last read from its backend.
#[derive(Debug, Clone)]
pub struct Observation {
    /// `Err` when the backend did not answer; the rest is then from the last good read.
    pub answer: Result<(), String>,
    /// Volumes and their bytes, by class (see [`volume_class`]).
    pub volumes: BTreeMap<String, (u64, u64)>,
    /// The pool of each device class (`default` for a backend with one pool).
    pub pools: BTreeMap<String, PoolCapacity>,
    /// `namespace/name` of each volume's claim, when the provisioner passed it.
    pub claims: HashMap<String, String>,
    /// Each volume's condition, by ID: why its storage is unhealthy, if it is
    /// (what ListVolumes reports).
    pub conditions: BTreeMap<String, Option<String>>,
}

impl Default for Observation {
    fn default() -> Self {
        Observation {
            answer: Ok(()),
            volumes: BTreeMap::new(),
            pools: BTreeMap::new(),
            claims: HashMap::new(),
            conditions: BTreeMap::new(),
        }
    }
}

/// The driver's telemetry: call counters, and the last backend observation.
pub struct Telemetry {
    pub rpc: RpcMetrics,
    /// Device classes whose pools are observed; empty for a backend with a single pool.
    classes: Vec<String>,
    observed: RwLock<Option<Observation>>,
    changed: Notify,
}

/// The condition message of a healthy volume, as CSI calls report it.
pub const HEALTHY: &str = "volume is healthy";

/// How often the backend is observed when nothing changes (its pool may be shared).
pub const OBSERVE_PERIOD: Duration = Duration::from_secs(30);

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::for_classes(Vec::new())
    }
}

/// The class a volume is counted under: its backend layout parameters (`type`, `deviceClass`),
/// or `default` when the StorageClass set none.
pub fn volume_class(record: &VolumeRecord) -> String {
    let parts: Vec<&str> = ["deviceClass", "type"]
        .iter()
        .filter_map(|k| record.params.backend.get(*k).map(String::as_str))
        .collect();
    if parts.is_empty() {
        "default".to_owned()
    } else {
        parts.join("/")
    }
}

/// `namespace/name` of the claim a volume was provisioned for, when known.
pub fn claim_of(record: &VolumeRecord) -> Option<String> {
    match (&record.params.pvc_namespace, &record.params.pvc_name) {
        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
        _ => None,
    }
}

/// Read volumes and pools from the backend (blocking: files or lvm2). `classes` are the device
/// classes to read pools of; empty for a backend with a single pool.
pub fn observe(
    backend: &dyn Backend,
    classes: &[String],
    last: Option<&Observation>,
) -> Observation {
    let mut next = last.cloned().unwrap_or_default();
    let volumes = backend.list();
    let mut pools = BTreeMap::new();
    let mut pool_error = None;
    if classes.is_empty() {
        match backend.capacity(&BTreeMap::new()) {
            Ok(p) => drop(pools.insert("default".to_owned(), p)),
            Err(e) => pool_error = Some(e.to_string()),
        }
    }
    for class in classes {
        let params = BTreeMap::from([("deviceClass".to_owned(), class.clone())]);
        match backend.capacity(&params) {
            Ok(p) => drop(pools.insert(class.clone(), p)),
            Err(e) => pool_error = Some(format!("device class {class}: {e}")),
        }
    }
    if pool_error.is_none() {
        next.pools = pools;
    }
    let volume_error = match volumes {
        Ok(list) => {
            next.volumes.clear();
            next.claims.clear();
            next.conditions.clear();
            for v in &list {
                next.conditions.insert(v.id.to_string(), backend.health(v));
                let e = next.volumes.entry(volume_class(v)).or_default();
                e.0 += 1;
                e.1 += v.capacity_bytes;
                if let Some(claim) = claim_of(v) {
                    next.claims.insert(v.id.to_string(), claim);
                }
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    next.answer = match pool_error.or(volume_error) {
        None => Ok(()),
        Some(e) => Err(format!("{} backend does not answer: {e}", backend.kind())),
    };
    next
}

impl Telemetry {
    pub fn for_classes(classes: Vec<String>) -> Self {
        Telemetry {
            rpc: RpcMetrics::default(),
            classes,
            observed: RwLock::new(None),
            changed: Notify::new(),
        }
    }

    /// Ask the refresher for a new observation (coalesced: many calls, one read).
    pub fn state_changed(&self) {
        self.changed.notify_one();
    }

    /// The claim of a volume, from the last observation.
    pub fn claim(&self, volume_id: &str) -> Option<String> {
        let observed = self.observed.read().ok()?;
        observed.as_ref()?.claims.get(volume_id).cloned()
    }

    pub fn observation(&self) -> Option<Observation> {
        self.observed.read().ok().and_then(|o| o.clone())
    }

    fn store(&self, observation: Observation) {
        if let Ok(mut o) = self.observed.write() {
            *o = Some(observation);
        }
    }

    /// Refresh the observation now, after every state change, and every `period`, until the
    /// process ends. One read at a time, off the request path.
    pub async fn keep_fresh(self: Arc<Self>, backend: Arc<dyn Backend>, period: Duration) {
        loop {
            let (backend, classes, last) =
                (backend.clone(), self.classes.clone(), self.observation());
            let started = Instant::now();
            match tokio::task::spawn_blocking(move || {
                observe(backend.as_ref(), &classes, last.as_ref())
            })
            .await
            {
                Ok(observation) => {
                    if let Err(e) = &observation.answer {
                        tracing::warn!(error = %e, "backend observation failed");
                    }
                    self.store(observation);
                }
                Err(e) => tracing::error!(error = %e, "backend observation panicked"),
            }
            tracing::trace!(
                took_ms = started.elapsed().as_millis() as u64,
                "backend observed"
            );
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}

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

/// Wraps the tonic server: one span per call carrying the RPC name, and one observation per call.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    telemetry: Arc<Telemetry>,
}

impl RpcMetricsLayer {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        RpcMetricsLayer { telemetry }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

/// The gRPC status of a unary response: tonic puts an error's status in the headers
/// ("trailers-only"); a success carries none there.
fn response_code<B>(response: &http::Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or(Code::Ok)
}

/// The status message of a failed unary response, decoded.
fn response_message<B>(response: &http::Response<B>) -> String {
    response
        .headers()
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default()
}

/// grpc-message is percent-encoded (gRPC HTTP/2 protocol spec).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let rpc = rpc_name(request.uri().path()).to_owned();
        let span = tracing::info_span!("csi", rpc = %rpc);
        let telemetry = self.telemetry.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(
            async move {
                let result = call.await;
                let (code, message) = match &result {
                    Ok(response) => (response_code(response), response_message(response)),
                    Err(_) => (Code::Internal, String::new()),
                };
                let elapsed = started.elapsed();
                telemetry.rpc.record(&rpc, code, elapsed.as_secs_f64());
                if changes_state(&rpc) {
                    telemetry.state_changed();
                }
                let duration_ms = elapsed.as_millis() as u64;
                if code == Code::Ok {
                    tracing::debug!(duration_ms, "ok");
                } else {
                    tracing::info!(code = %code_name(code), error = %message, duration_ms, "failed");
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests;
