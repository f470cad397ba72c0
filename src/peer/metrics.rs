//! What the peer channel counts: bytes served and pulled, and calls by outcome. The caller
//! registers the families in its own registry, next to the driver's other metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// Counters of both ends of the channel; clones share the same counters.
#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    served_bytes: Counter,
    reads: Family<OutcomeLabels, Counter>,
    pulled_bytes: Counter,
    pulls: Family<OutcomeLabels, Counter>,
}

impl PeerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kennel_peer_served_bytes",
            "Snapshot bytes sent to other nodes",
            self.served_bytes.clone(),
        );
        registry.register(
            "kennel_peer_reads",
            "Snapshot reads asked by other nodes, by outcome (OK or the gRPC code)",
            self.reads.clone(),
        );
        registry.register(
            "kennel_peer_pulled_bytes",
            "Snapshot bytes received from other nodes and written (counted again when resent)",
            self.pulled_bytes.clone(),
        );
        registry.register(
            "kennel_peer_pulls",
            "Snapshot pulls from other nodes, by outcome (OK or the gRPC code)",
            self.pulls.clone(),
        );
    }

    pub fn served_bytes(&self) -> u64 {
        self.served_bytes.get()
    }

    pub fn pulled_bytes(&self) -> u64 {
        self.pulled_bytes.get()
    }

    pub fn reads(&self, outcome: &str) -> u64 {
        self.reads.get_or_create(&label(outcome)).get()
    }

    pub fn pulls(&self, outcome: &str) -> u64 {
        self.pulls.get_or_create(&label(outcome)).get()
    }

    pub(super) fn served(&self, bytes: u64) {
        self.served_bytes.inc_by(bytes);
    }

    pub(super) fn pulled(&self, bytes: u64) {
        self.pulled_bytes.inc_by(bytes);
    }

    pub(super) fn read_done(&self, code: tonic::Code) {
        self.reads.get_or_create(&label(&outcome(code))).inc();
    }

    pub(super) fn pull_done(&self, code: tonic::Code) {
        self.pulls.get_or_create(&label(&outcome(code))).inc();
    }
}

fn label(outcome: &str) -> OutcomeLabels {
    OutcomeLabels {
        outcome: outcome.to_owned(),
    }
}

/// `OK`, `NotFound`, `PermissionDenied`...: the names the CSI call metrics use too.
pub fn outcome(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Tells when a transfer passes each tenth of its size, so logs show progress without a line
/// per chunk.
#[derive(Debug)]
pub struct Milestones {
    size: u64,
    next_tenth: u64,
}

impl Milestones {
    /// A transfer of `size` bytes that starts at `from` (a resumed one starts past 0).
    pub fn new(size: u64, from: u64) -> Self {
        let mut m = Milestones {
            size,
            next_tenth: 1,
        };
        m.passed(from);
        m
    }

    /// The percentage just reached (10, 20... 100) once `done` bytes are through, if a new
    /// tenth was passed.
    pub fn passed(&mut self, done: u64) -> Option<u64> {
        let mut reached = None;
        while self.next_tenth <= 10
            && u128::from(done) * 10 >= u128::from(self.size) * u128::from(self.next_tenth)
        {
            reached = Some(self.next_tenth * 10);
            self.next_tenth += 1;
        }
        reached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_fire_once_per_tenth() {
        let mut m = Milestones::new(1000, 0);
        assert_eq!(m.passed(99), None);
        assert_eq!(m.passed(100), Some(10));
        assert_eq!(m.passed(150), None);
        assert_eq!(m.passed(420), Some(40));
        assert_eq!(m.passed(1000), Some(100));
        assert_eq!(m.passed(1000), None);
        // A resumed transfer does not report what it had already passed.
        let mut resumed = Milestones::new(1000, 550);
        assert_eq!(resumed.passed(560), None);
        assert_eq!(resumed.passed(600), Some(60));
        // An empty transfer is done at once.
        assert_eq!(Milestones::new(0, 0).passed(0), None);
    }

    #[test]
    fn counters_are_registered_and_shared_by_clones() {
        let metrics = PeerMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let clone = metrics.clone();
        clone.served(4096);
        clone.read_done(tonic::Code::PermissionDenied);
        clone.pull_done(tonic::Code::Ok);
        assert_eq!(metrics.served_bytes(), 4096);
        assert_eq!(metrics.reads("PermissionDenied"), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("kennel_peer_served_bytes_total 4096"),
            "{text}"
        );
        assert!(
            text.contains("kennel_peer_reads_total{outcome=\"PermissionDenied\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kennel_peer_pulls_total{outcome=\"OK\"} 1"),
            "{text}"
        );
    }
}
