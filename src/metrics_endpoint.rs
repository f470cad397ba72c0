//! The HTTP endpoint `kennel driver` and `kennel retention` serve on `--metrics-addr`.
//!
//! Routes: `/metrics` (OpenMetrics text of a `prometheus-client` registry), `/healthz` (the
//! process answers) and `/readyz` (the exporter's own readiness). Handlers only read memory:
//! gauges come from state the daemon keeps up to date on its own schedule, so a scrape never
//! runs backend work and a slow or abandoned scrape leaves nothing behind.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Something with metrics to show and a notion of being ready. Both answers come from memory.
pub trait Exporter: Send + Sync + 'static {
    fn registry(&self) -> &Registry;
    /// `Err(why)` while the component cannot do its job.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Latency buckets in seconds: from a fast Probe to a long mkfs or image copy.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The routes, for [`serve`] and for tests that drive the router directly.
pub fn router(exporter: Arc<dyn Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(exporter)
}

async fn metrics(State(exporter): State<Arc<dyn Exporter>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, exporter.registry()) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

async fn readyz(State(exporter): State<Arc<dyn Exporter>>) -> Response {
    match exporter.ready() {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// Serve the routes on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, exporter: Arc<dyn Exporter>) -> std::io::Result<()> {
    serve_listener(TcpListener::bind(addr).await?, exporter).await
}

/// Like [`serve`], on a listener the caller bound (so it knows the port).
pub async fn serve_listener(
    listener: TcpListener,
    exporter: Arc<dyn Exporter>,
) -> std::io::Result<()> {
    axum::serve(listener, router(exporter)).await
}

/// A plain HTTP GET for tests and probes: `(status code, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let io_error = |e: hyper::Error| std::io::Error::other(e);
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(io_error)?;
    tokio::spawn(connection);
    let request = axum::http::Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<axum::body::Bytes>::new())
        .map_err(std::io::Error::other)?;
    let response = sender.send_request(request).await.map_err(io_error)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(io_error)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        a: String,
    }

    struct Fixed {
        registry: Registry,
        ready: Result<(), String>,
    }

    impl Exporter for Fixed {
        fn registry(&self) -> &Registry {
            &self.registry
        }
        fn ready(&self) -> Result<(), String> {
            self.ready.clone()
        }
    }

    fn fixed(ready: Result<(), String>) -> Arc<dyn Exporter> {
        let family = Family::<Labels, Counter>::default();
        family
            .get_or_create(&Labels {
                a: "q\"uote".into(),
            })
            .inc_by(3);
        let mut registry = Registry::default();
        registry.register("x", "An example", family);
        Arc::new(Fixed { registry, ready })
    }

    async fn spawn(exporter: Arc<dyn Exporter>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_listener(listener, exporter));
        addr
    }

    #[tokio::test]
    async fn endpoint_routes() {
        let addr = spawn(fixed(Ok(()))).await;
        let (status, body) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("x_total{a=\"q\\\"uote\"} 3\n"), "{body}");
        assert!(body.contains("# HELP x An example.\n"), "{body}");
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
        assert_eq!(http_get(addr, "/readyz").await.unwrap().0, 200);
        assert_eq!(http_get(addr, "/nothing").await.unwrap().0, 404);

        let addr = spawn(fixed(Err("pool gone".into()))).await;
        let (status, body) = http_get(addr, "/readyz").await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("pool gone"));
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
    }

    /// A client that connects and never finishes its request holds no task that blocks others:
    /// the next scrape is answered at once.
    #[tokio::test]
    async fn a_stalled_client_does_not_hold_up_scrapes() {
        let addr = spawn(fixed(Ok(()))).await;
        let mut stalled = Vec::new();
        for _ in 0..50 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /metrics HTTP/1.1\r\n")
                .await
                .unwrap();
            stalled.push(s);
        }
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            http_get(addr, "/metrics"),
        )
        .await
        .expect("answered while 50 requests stall");
        assert_eq!(answer.unwrap().0, 200);
    }
}
