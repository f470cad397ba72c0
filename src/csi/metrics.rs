//! Driver metrics: every gRPC call counted and timed by a tower layer around the tonic server,
//! plus volumes and pool space read from the backend when Prometheus scrapes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tonic::codegen::http;
use tonic::Code;
use tracing::Instrument as _;

use crate::backend::{Backend, VolumeRecord};
use crate::metrics::{header, sample, CounterVec, Exporter, HistogramVec, LATENCY_BUCKETS};

/// Counts and latencies of CSI calls, by RPC name and status code.
#[derive(Debug)]
pub struct RpcMetrics {
    calls: CounterVec,
    errors: CounterVec,
    latency: HistogramVec,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics {
            calls: CounterVec::default(),
            errors: CounterVec::default(),
            latency: HistogramVec::new(LATENCY_BUCKETS),
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

impl RpcMetrics {
    pub fn record(&self, rpc: &str, code: Code, seconds: f64) {
        self.calls.inc(&[rpc]);
        if code != Code::Ok {
            self.errors.inc(&[rpc, &code_name(code)]);
        }
        self.latency.observe(rpc, seconds);
    }

    pub fn calls(&self, rpc: &str) -> u64 {
        self.calls.get(&[rpc])
    }

    pub fn errors(&self, rpc: &str, code: Code) -> u64 {
        self.errors.get(&[rpc, &code_name(code)])
    }

    pub fn render(&self, out: &mut String) {
        self.calls.render(
            out,
            "kennel_csi_rpc_total",
            "CSI calls handled, by RPC.",
            &["rpc"],
        );
        self.errors.render(
            out,
            "kennel_csi_rpc_errors_total",
            "CSI calls that failed, by RPC and gRPC status code.",
            &["rpc", "code"],
        );
        self.latency.render(
            out,
            "kennel_csi_rpc_duration_seconds",
            "Time to answer a CSI call, by RPC.",
            "rpc",
        );
    }
}

/// Wraps the tonic server: one span per call carrying the RPC name, and one observation per call.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        RpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
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
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(
            async move {
                let result = call.await;
                let code = match &result {
                    Ok(response) => response_code(response),
                    Err(_) => Code::Internal,
                };
                let elapsed = started.elapsed();
                metrics.record(&rpc, code, elapsed.as_secs_f64());
                if code == Code::Ok {
                    tracing::debug!(took_ms = elapsed.as_millis() as u64, "ok");
                } else {
                    tracing::info!(code = %code_name(code), took_ms = elapsed.as_millis() as u64, "failed");
                }
                result
            }
            .instrument(span),
        )
    }
}

/// What `/metrics` and `/readyz` of `kennel driver` show.
pub struct DriverExporter {
    pub rpc: Arc<RpcMetrics>,
    pub backend: Arc<dyn Backend>,
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

impl Exporter for DriverExporter {
    fn render(&self) -> String {
        let mut out = String::new();
        self.rpc.render(&mut out);
        let kind = self.backend.kind();
        if kind == "lvm" {
            crate::backend::lvm::metrics::render(&mut out);
        }

        let volumes = self.backend.list();
        header(
            &mut out,
            "kennel_backend_up",
            "gauge",
            "1 when the backend answered the last scrape.",
        );
        let pool = self.backend.capacity(&BTreeMap::new());
        let up = volumes.is_ok() && pool.is_ok();
        sample(
            &mut out,
            "kennel_backend_up",
            &[("backend", kind)],
            u8::from(up),
        );

        if let Ok(volumes) = &volumes {
            let mut by_class: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for v in volumes {
                let e = by_class.entry(volume_class(v)).or_default();
                e.0 += 1;
                e.1 += v.capacity_bytes;
            }
            header(
                &mut out,
                "kennel_volumes",
                "gauge",
                "Volumes provisioned on this node, by backend and class.",
            );
            for (class, (count, _)) in &by_class {
                sample(
                    &mut out,
                    "kennel_volumes",
                    &[("backend", kind), ("class", class)],
                    count,
                );
            }
            header(
                &mut out,
                "kennel_volume_bytes",
                "gauge",
                "Capacity of the volumes provisioned on this node, by backend and class.",
            );
            for (class, (_, bytes)) in &by_class {
                sample(
                    &mut out,
                    "kennel_volume_bytes",
                    &[("backend", kind), ("class", class)],
                    bytes,
                );
            }
        }
        if let Ok(pool) = pool {
            for (name, help, value) in [
                (
                    "kennel_pool_capacity_bytes",
                    "Size of the backend's pool.",
                    pool.total_bytes,
                ),
                (
                    "kennel_pool_free_bytes",
                    "Room left in the backend's pool for new volumes.",
                    pool.available_bytes,
                ),
                (
                    "kennel_pool_provisioned_bytes",
                    "Bytes promised to existing volumes.",
                    pool.provisioned_bytes,
                ),
            ] {
                header(&mut out, name, "gauge", help);
                sample(&mut out, name, &[("backend", kind)], value);
            }
        }
        header(
            &mut out,
            "kennel_build_info",
            "gauge",
            "Version of the running driver.",
        );
        sample(
            &mut out,
            "kennel_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("backend", kind)],
            1,
        );
        out
    }

    fn ready(&self) -> Result<(), String> {
        self.backend
            .capacity(&BTreeMap::new())
            .map(drop)
            .map_err(|e| format!("{} backend does not answer: {e}", self.backend.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_and_codes() {
        assert_eq!(rpc_name("/csi.v1.Controller/CreateVolume"), "CreateVolume");
        assert_eq!(rpc_name(""), "unknown");
        assert_eq!(code_name(Code::NotFound), "NotFound");
        let m = RpcMetrics::default();
        m.record("DeleteVolume", Code::Ok, 0.002);
        m.record("NodeStageVolume", Code::NotFound, 0.001);
        assert_eq!(m.calls("NodeStageVolume"), 1);
        assert_eq!(m.errors("NodeStageVolume", Code::NotFound), 1);
        assert_eq!(m.errors("DeleteVolume", Code::NotFound), 0);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "kennel_csi_rpc_errors_total{rpc=\"NodeStageVolume\",code=\"NotFound\"} 1\n"
        ));
        assert!(out.contains("kennel_csi_rpc_duration_seconds_count{rpc=\"DeleteVolume\"} 1\n"));
    }

    #[test]
    fn error_status_is_read_from_headers() {
        let ok = http::Response::new(());
        assert_eq!(response_code(&ok), Code::Ok);
        let err = Status::not_found("x").into_http::<()>();
        assert_eq!(response_code(&err), Code::NotFound);
    }

    use tonic::Status;
}
