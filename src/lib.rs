//! Kennel: node-local persistent storage for Kubernetes StatefulSets.

pub mod backend;
pub mod bench;
pub mod csi;
pub mod ctl;
pub mod demo;
pub mod driver;
pub mod error;
pub mod faults;
pub mod metrics_endpoint;
pub mod model;
pub mod node;
pub mod peer;
pub mod retention;
pub mod shutdown;
pub mod topology;
pub mod volume;
