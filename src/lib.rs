//! Kennel: node-local persistent storage for Kubernetes StatefulSets.

pub mod retention;
