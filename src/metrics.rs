//! Prometheus text exposition and the small HTTP endpoint that serves it.
//!
//! Both `kennel driver` and `kennel retention` use this: each implements [`Exporter`] and calls
//! [`serve`] on its `--metrics-addr`. Routes: `/metrics` (text format 0.0.4), `/healthz` (the
//! process answers), `/readyz` (the exporter's own readiness check).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Something with metrics to show and a notion of being ready.
///
/// Both methods may block (a backend scrape reads files or runs lvm2); the server calls them on
/// the blocking thread pool.
pub trait Exporter: Send + Sync + 'static {
    /// The metrics in the Prometheus text format.
    fn render(&self) -> String;
    /// `Err(why)` while the component cannot do its job.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// How long a scrape or readiness check may take before the endpoint answers 503.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// `# HELP` and `# TYPE` lines of one metric family.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line: `name{k="v",...} value`.
pub fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A label value escaped for the text format.
pub fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A counter family keyed by its label values.
#[derive(Debug, Default)]
pub struct CounterVec {
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: &[&str], n: u64) {
        if let Ok(mut m) = self.values.lock() {
            let key = labels.iter().map(|s| (*s).to_owned()).collect();
            *m.entry(key).or_default() += n;
        }
    }

    pub fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        self.values
            .lock()
            .map(|m| m.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Write the family; `names` are the label names, in the order values were given.
    pub fn render(&self, out: &mut String, name: &str, help: &str, names: &[&str]) {
        header(out, name, "counter", help);
        if let Ok(m) = self.values.lock() {
            for (values, count) in m.iter() {
                let labels: Vec<(&str, &str)> = names
                    .iter()
                    .copied()
                    .zip(values.iter().map(String::as_str))
                    .collect();
                sample(out, name, &labels, count);
            }
        }
    }
}

/// Latency buckets in seconds: from a fast Probe to a long mkfs or image copy.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Buckets {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram family with one label.
#[derive(Debug)]
pub struct HistogramVec {
    bounds: &'static [f64],
    values: Mutex<BTreeMap<String, Buckets>>,
}

impl HistogramVec {
    pub fn new(bounds: &'static [f64]) -> Self {
        HistogramVec {
            bounds,
            values: Mutex::default(),
        }
    }

    pub fn observe(&self, label: &str, seconds: f64) {
        if let Ok(mut m) = self.values.lock() {
            let b = m.entry(label.to_owned()).or_insert_with(|| Buckets {
                counts: vec![0; self.bounds.len()],
                ..Buckets::default()
            });
            for (i, bound) in self.bounds.iter().enumerate() {
                if seconds <= *bound {
                    b.counts[i] += 1;
                }
            }
            b.sum += seconds;
            b.count += 1;
        }
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        header(out, name, "histogram", help);
        let Ok(m) = self.values.lock() else { return };
        let bucket = format!("{name}_bucket");
        for (value, b) in m.iter() {
            for (bound, count) in self.bounds.iter().zip(&b.counts) {
                sample(
                    out,
                    &bucket,
                    &[(label, value), ("le", &bound.to_string())],
                    count,
                );
            }
            sample(out, &bucket, &[(label, value), ("le", "+Inf")], b.count);
            sample(out, &format!("{name}_sum"), &[(label, value)], b.sum);
            sample(out, &format!("{name}_count"), &[(label, value)], b.count);
        }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, exporter: Arc<dyn Exporter>) -> std::io::Result<()> {
    serve_listener(TcpListener::bind(addr).await?, exporter).await
}

/// Like [`serve`], on a listener the caller bound (so it knows the port).
pub async fn serve_listener(
    listener: TcpListener,
    exporter: Arc<dyn Exporter>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let exporter = exporter.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, exporter).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

/// Run a possibly blocking check off the runtime, bounded by [`CHECK_TIMEOUT`].
async fn blocking<T: Send + 'static>(
    exporter: Arc<dyn Exporter>,
    f: fn(&dyn Exporter) -> Result<T, String>,
) -> Result<T, String> {
    let task = tokio::task::spawn_blocking(move || f(exporter.as_ref()));
    match tokio::time::timeout(CHECK_TIMEOUT, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(format!("check panicked: {e}")),
        Err(_) => Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
    }
}

async fn answer(mut stream: TcpStream, exporter: Arc<dyn Exporter>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request head is all we need; bodies are not expected.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts
        .next()
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match blocking(exporter, |e| Ok(e.render())).await {
            Ok(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET" | "HEAD", "/readyz") => match blocking(exporter, |e| e.ready()).await {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        reply.push_str(&body);
    }
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// A minimal HTTP GET for tests and probes: `(status code, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<(), String>);

    impl Exporter for Fixed {
        fn render(&self) -> String {
            let mut out = String::new();
            header(&mut out, "x_total", "counter", "An example.");
            sample(&mut out, "x_total", &[("a", "q\"uote")], 3);
            out
        }
        fn ready(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = HistogramVec::new(&[0.1, 1.0]);
        h.observe("A", 0.05);
        h.observe("A", 0.5);
        h.observe("A", 5.0);
        let mut out = String::new();
        h.render(&mut out, "d_seconds", "Latency.", "rpc");
        assert!(
            out.contains("d_seconds_bucket{rpc=\"A\",le=\"0.1\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_bucket{rpc=\"A\",le=\"1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("d_seconds_bucket{rpc=\"A\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("d_seconds_count{rpc=\"A\"} 3\n"), "{out}");
        assert!(out.contains("# TYPE d_seconds histogram\n"));
    }

    #[test]
    fn counters_render_with_labels() {
        let c = CounterVec::default();
        c.inc(&["CreateVolume", "NotFound"]);
        c.add(&["CreateVolume", "NotFound"], 2);
        assert_eq!(c.get(&["CreateVolume", "NotFound"]), 3);
        let mut out = String::new();
        c.render(&mut out, "e_total", "Errors.", &["rpc", "code"]);
        assert!(out.contains("e_total{rpc=\"CreateVolume\",code=\"NotFound\"} 3\n"));
    }

    #[tokio::test]
    async fn endpoint_routes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_listener(listener, Arc::new(Fixed(Ok(())))));
        let (status, body) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("x_total{a=\"q\\\"uote\"} 3\n"), "{body}");
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
        assert_eq!(http_get(addr, "/readyz").await.unwrap().0, 200);
        assert_eq!(http_get(addr, "/nothing").await.unwrap().0, 404);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_listener(
            listener,
            Arc::new(Fixed(Err("pool gone".into()))),
        ));
        let (status, body) = http_get(addr, "/readyz").await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("pool gone"));
        assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
    }
}
