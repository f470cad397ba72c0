//! The tower layer around the tonic server: one span per call carrying the RPC name, the call
//! counted and timed, its failure logged with the gRPC status, and a state change announced.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tonic::codegen::http;
use tonic::Code;
use tracing::Instrument as _;

use super::rpc_counts::{changes_state, code_name, rpc_name};
use super::telemetry::Telemetry;

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
pub(super) fn response_code<B>(response: &http::Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or(Code::Ok)
}

/// The status message of a failed unary response, decoded.
pub(super) fn response_message<B>(response: &http::Response<B>) -> String {
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
        let span = tracing::info_span!(target: super::LOG_TARGET, "csi", rpc = %rpc);
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
                    tracing::debug!(target: super::LOG_TARGET, duration_ms, "ok");
                } else {
                    tracing::info!(target: super::LOG_TARGET, code = %code_name(code), error = %message, duration_ms, "failed");
                }
                result
            }
            .instrument(span),
        )
    }
}
