//! StatefulSet PVC retention controller (`kennel retention`).
//!
//! `policy` decides, `controller` talks to the API server. See the README section
//! "Retention controller" for the user-facing behaviour.

pub mod builtin;
pub mod duration;
pub mod names;
pub mod nodeloss;
pub mod owners;
pub mod policy;

pub mod controller;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod rbac;
