//! One read of the backend: its volumes by class, its pools, each volume's claim and condition.
//! Blocking (files or lvm2); the telemetry runs it off the request path.

use std::collections::{BTreeMap, HashMap};

use crate::backend::{Backend, PoolCapacity, VolumeRecord};

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

/// The condition message of a healthy volume, as CSI calls report it.
pub const HEALTHY: &str = "volume is healthy";

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
