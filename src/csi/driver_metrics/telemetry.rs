//! [`Telemetry`]: the call counters and the last backend observation, which a background task
//! refreshes after each call that changes state and on a slow timer.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::observation::{observe, Observation};
use super::rpc_counts::RpcMetrics;
use crate::backend::Backend;

/// The driver's telemetry: call counters, and the last backend observation.
pub struct Telemetry {
    pub rpc: RpcMetrics,
    /// Device classes whose pools are observed; empty for a backend with a single pool.
    classes: Vec<String>,
    observed: RwLock<Option<Observation>>,
    changed: Notify,
}

/// How often the backend is observed when nothing changes (its pool may be shared).
pub const OBSERVE_PERIOD: Duration = Duration::from_secs(30);

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::for_classes(Vec::new())
    }
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

    pub(super) fn store(&self, observation: Observation) {
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
                        tracing::warn!(target: super::LOG_TARGET, error = %e, "backend observation failed");
                    }
                    self.store(observation);
                }
                Err(e) => {
                    tracing::error!(target: super::LOG_TARGET, error = %e, "backend observation panicked")
                }
            }
            tracing::trace!(
                target: super::LOG_TARGET,
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
