//! Controller-side decisions: create, delete, expand, list, capacity.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{Backend, PoolCapacity, VolumeRecord};
use crate::error::{Error, Result};
use crate::volume::capacity::{choose_size, CapacityRange, GIB};
use crate::volume::locks::LockMap;
use crate::volume::spec::{segment_matches, Capability, CreateRequest, Segment, VolumeParams};
use crate::volume::{token, VolumeId};

/// Size of a volume whose request names no capacity.
pub const DEFAULT_VOLUME_BYTES: u64 = GIB;

/// Who this driver is: stamped on every volume it creates.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub machine_id: String,
    pub topology: Segment,
}

pub struct Controller {
    backend: Arc<dyn Backend>,
    locks: LockMap,
    identity: NodeIdentity,
}

/// A volume and, if something is wrong with it, what.
pub type VolumeStatus = (VolumeRecord, Option<String>);

impl Controller {
    pub fn new(backend: Arc<dyn Backend>, locks: LockMap, identity: NodeIdentity) -> Self {
        Controller {
            backend,
            locks,
            identity,
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub async fn create(&self, req: CreateRequest) -> Result<VolumeRecord> {
        let _guard = self.locks.lock(format!("name:{}", req.name)).await;
        if !req.requisite.is_empty()
            && !req
                .requisite
                .iter()
                .any(|s| segment_matches(s, &self.identity.topology))
        {
            return Err(Error::Exhausted(format!(
                "node {} is not in the requisite topology",
                self.identity.node_id
            )));
        }
        let name = req.name.clone();
        if let Some(existing) = self.blocking(move |b| b.find_by_name(&name)).await? {
            return check_same_volume(existing, &req);
        }
        let minimum = req
            .fs_type()
            .map_or(self.backend.granularity(), |fs| fs.minimum_bytes());
        let size = choose_size(
            req.capacity,
            self.backend.granularity(),
            minimum,
            DEFAULT_VOLUME_BYTES,
        )?;
        let record = VolumeRecord {
            id: VolumeId::generate(),
            name: req.name,
            capacity_bytes: size,
            requested: req.capacity,
            capabilities: req.capabilities,
            params: req.params,
            node_id: self.identity.node_id.clone(),
            machine_id: self.identity.machine_id.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let stored = record.clone();
        self.blocking(move |b| b.create(&stored)).await?;
        tracing::info!(volume_id = %record.id, name = %record.name, bytes = size, "volume created");
        Ok(record)
    }

    /// Deleting a volume that does not exist (or cannot exist) succeeds.
    pub async fn delete(&self, raw_id: &str) -> Result<()> {
        let Some(id) = VolumeId::parse(raw_id) else {
            return Ok(());
        };
        let _guard = self.locks.lock(id.as_str()).await;
        self.blocking(move |b| b.delete(&id)).await
    }

    pub async fn get(&self, raw_id: &str) -> Result<VolumeStatus> {
        let id = parse_known(raw_id)?;
        self.blocking(move |b| {
            let record = b
                .get(&id)?
                .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
            let health = b.health(&record);
            Ok((record, health))
        })
        .await
    }

    /// Whether the volume can be used with all of `capabilities` and `params`.
    /// `Err(reason)` inside the Ok explains a refusal without failing the call.
    pub async fn validate(
        &self,
        raw_id: &str,
        capabilities: &[Capability],
        params: Option<&VolumeParams>,
    ) -> Result<std::result::Result<(), String>> {
        let (record, _) = self.get(raw_id).await?;
        if let Some(params) = params {
            if !params.same_volume_as(&record.params) {
                return Ok(Err("parameters differ from the volume's".to_owned()));
            }
        }
        let volume_fs = record.capabilities.iter().find_map(Capability::fs_type);
        for cap in capabilities {
            if let (Some(asked), Some(has)) = (cap.fs_type(), volume_fs) {
                if asked != has {
                    return Ok(Err(format!(
                        "volume carries {}, not {}",
                        has.name(),
                        asked.name()
                    )));
                }
            }
        }
        Ok(Ok(()))
    }

    pub async fn list(
        &self,
        starting_token: &str,
        max_entries: i32,
    ) -> Result<(Vec<VolumeStatus>, String)> {
        // Reject a bad token before touching the backend.
        token::decode(starting_token)?;
        let all = self
            .blocking(|b| {
                Ok(b.list()?
                    .into_iter()
                    .map(|r| {
                        let health = b.health(&r);
                        (r, health)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        token::page(all, |(r, _)| &r.id, starting_token, max_entries)
    }

    /// Room for new volumes reachable from `topology` (all of it when unset).
    pub async fn capacity(&self, topology: Option<&Segment>) -> Result<PoolCapacity> {
        let cap = self.blocking(|b| b.capacity()).await?;
        match topology {
            Some(segment) if !segment_matches(segment, &self.identity.topology) => {
                Ok(PoolCapacity {
                    available_bytes: 0,
                    ..cap
                })
            }
            _ => Ok(cap),
        }
    }

    /// Grow the volume's storage; returns the new size.
    pub async fn expand(&self, raw_id: &str, range: CapacityRange) -> Result<u64> {
        let id = parse_known(raw_id)?;
        let _guard = self.locks.lock(id.as_str()).await;
        let granularity = self.backend.granularity();
        self.blocking(move |b| {
            let record = b
                .get(&id)?
                .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
            if range.limit != 0 && record.capacity_bytes > range.limit {
                return Err(Error::OutOfRange(format!(
                    "volume is already {} bytes, above the limit of {} bytes",
                    record.capacity_bytes, range.limit
                )));
            }
            if record.capacity_bytes >= range.required {
                return Ok(record.capacity_bytes);
            }
            let size = choose_size(range, granularity, granularity, record.capacity_bytes)?;
            Ok(b.expand(&id, size)?.capacity_bytes)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        run_blocking(self.backend.clone(), f).await
    }
}

/// Run backend work on the blocking pool so slow I/O never stalls other RPCs.
pub async fn run_blocking<T: Send + 'static>(
    backend: Arc<dyn Backend>,
    f: impl FnOnce(&dyn Backend) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || f(backend.as_ref()))
        .await
        .map_err(|e| Error::Internal(format!("backend task failed: {e}")))?
}

/// An ID that can only be valid if it parses; otherwise the volume does not exist.
pub fn parse_known(raw_id: &str) -> Result<VolumeId> {
    if raw_id.is_empty() {
        return Err(Error::invalid("volume_id is required"));
    }
    VolumeId::parse(raw_id).ok_or_else(|| Error::VolumeNotFound(raw_id.to_owned()))
}

/// A repeated CreateVolume must describe the volume that exists.
fn check_same_volume(existing: VolumeRecord, req: &CreateRequest) -> Result<VolumeRecord> {
    let conflict = |reason: String| Error::NameConflict {
        name: req.name.clone(),
        reason,
    };
    if !req.capacity.admits(existing.capacity_bytes) {
        return Err(conflict(format!(
            "it has {} bytes, outside the requested range",
            existing.capacity_bytes
        )));
    }
    let existing_fs = existing.capabilities.iter().find_map(Capability::fs_type);
    if req.fs_type().is_some() && existing_fs.is_some() && req.fs_type() != existing_fs {
        return Err(conflict("it was created for another filesystem".to_owned()));
    }
    let existing_block = existing.capabilities.iter().any(Capability::is_block);
    if !existing.capabilities.is_empty() && req.wants_block() != existing_block {
        return Err(conflict(
            "it was created for another access type".to_owned(),
        ));
    }
    if !req.params.same_volume_as(&existing.params) {
        return Err(conflict("it was created with other parameters".to_owned()));
    }
    Ok(existing)
}
