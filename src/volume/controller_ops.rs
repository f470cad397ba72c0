//! Controller-side decisions: create, delete, expand, list, capacity.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use crate::backend::{Backend, PoolCapacity, SnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;
use crate::model::spec::{segment_matches, Capability, CreateRequest, Segment, VolumeParams};
use crate::model::volume_size::{choose_size, CapacityRange, GIB};
use crate::model::ContentSource;
use crate::model::{SnapshotId, VolumeId};
use crate::volume::readers::Readers;
use crate::volume::token;
use crate::volume::work::Work;

/// Size of a volume whose request names no capacity.
pub const DEFAULT_VOLUME_BYTES: u64 = GIB;

/// Who this driver is: stamped on every volume it creates.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub machine_id: String,
    pub topology: Segment,
}

/// Cheap to clone: clones share the backend, the locks and the running operations.
#[derive(Clone)]
pub struct Controller {
    backend: Arc<dyn Backend>,
    work: Work,
    identity: NodeIdentity,
    /// Snapshots peers are reading: not deleted meanwhile.
    readers: Readers,
}

/// A volume and, if something is wrong with it, what.
pub type VolumeStatus = (VolumeRecord, Option<String>);

impl Controller {
    pub fn new(backend: Arc<dyn Backend>, work: Work, identity: NodeIdentity) -> Self {
        Controller {
            backend,
            work,
            identity,
            readers: Readers::default(),
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The backend itself, for metrics and readiness checks.
    pub fn backend(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub async fn create(&self, req: CreateRequest) -> Result<VolumeRecord> {
        // The source stays whole for the copy: deleting it waits (or answers ABORTED). Lock
        // order is fixed, name before source, so two creates never deadlock.
        let mut keys = vec![format!("name:{}", req.name)];
        match &req.source {
            Some(ContentSource::Volume(id)) => keys.push(id.as_str().to_owned()),
            Some(ContentSource::Snapshot(id)) => keys.push(id.as_str().to_owned()),
            None => {}
        }
        let this = self.clone();
        self.work
            .run(keys, async move { this.create_locked(req).await })
            .await
    }

    /// A volume asked of nodes other than this one cannot be made here.
    fn check_requisite(&self, req: &CreateRequest) -> Result<()> {
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
        Ok(())
    }

    async fn create_locked(&self, req: CreateRequest) -> Result<VolumeRecord> {
        self.check_requisite(&req)?;
        let name = req.name.clone();
        let backend_params = req.params.backend.clone();
        let source = req.source.clone();
        let (existing, source_bytes) = self
            .blocking(move |b| {
                crate::faults::step("create: locked");
                b.check_params(&backend_params)?;
                let source_bytes = match &source {
                    Some(source) => Some(source_size(b, source)?),
                    None => None,
                };
                Ok((b.find_by_name(&name)?, source_bytes))
            })
            .await?;
        if let Some(existing) = existing {
            return check_same_volume(existing, &req);
        }
        let record = self.new_record(req, source_bytes.unwrap_or(0))?;
        let stored = record.clone();
        self.blocking(move |b| b.create(&stored)).await?;
        tracing::debug!(volume_id = %record.id, volume_name = %record.name, bytes = record.capacity_bytes, "volume created");
        Ok(record)
    }

    /// The record of a new volume for `req`, sized to hold `content_bytes` of copied data.
    fn new_record(&self, req: CreateRequest, content_bytes: u64) -> Result<VolumeRecord> {
        let granularity = self.backend.granularity();
        let fs_minimum = req.fs_type().map_or(granularity, |fs| fs.minimum_bytes());
        // A copy needs at least the source's size.
        let minimum = fs_minimum.max(content_bytes);
        let default = DEFAULT_VOLUME_BYTES.max(content_bytes);
        let size = choose_size(req.capacity, granularity, minimum, default)?;
        Ok(VolumeRecord {
            id: VolumeId::generate(),
            name: req.name,
            capacity_bytes: size,
            requested: req.capacity,
            capabilities: req.capabilities,
            params: req.params,
            node_id: self.identity.node_id.clone(),
            machine_id: self.identity.machine_id.clone(),
            created_unix: now_unix(),
            source: req.source,
        })
    }

    /// Deleting a volume that does not exist (or cannot exist) succeeds.
    pub async fn delete(&self, raw_id: &str) -> Result<()> {
        let Some(id) = VolumeId::parse(raw_id) else {
            return Ok(());
        };
        self.exclusive(vec![id.as_str().to_owned()], move |b| {
            crate::faults::step("delete: locked");
            b.delete(&id)
        })
        .await
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
        token::decode::<VolumeId>(starting_token)?;
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

    /// Room for new volumes with these backend parameters, reachable from
    /// `topology` (all of it when unset).
    pub async fn capacity(
        &self,
        params: BTreeMap<String, String>,
        topology: Option<&Segment>,
    ) -> Result<PoolCapacity> {
        let cap = self
            .blocking(move |b| {
                b.check_params(&params)?;
                b.capacity(&params)
            })
            .await?;
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
        let granularity = self.backend.granularity();
        self.exclusive(vec![id.as_str().to_owned()], move |b| {
            crate::faults::step("expand: locked");
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

    /// Change a volume's mutable parameters (its I/O limits); keys left out
    /// keep their values. Idempotent. `apply` puts the stored limits into
    /// effect (the pods of this node, see `NodeOps::io_limits_applier`) in
    /// the same locked task: a publish meanwhile never applies stale limits,
    /// and a caller that gives up still leaves them stored and applied.
    pub async fn modify(
        &self,
        raw_id: &str,
        params: BTreeMap<String, String>,
        apply: impl FnOnce(&dyn Backend, &VolumeRecord) -> Result<()> + Send + 'static,
    ) -> Result<VolumeRecord> {
        let id = parse_known(raw_id)?;
        if params.is_empty() {
            return Err(Error::invalid("mutable_parameters are required"));
        }
        // Checked before the volume is looked up: a bad key is the caller's to fix.
        IoLimits::default().apply(&params)?;
        self.exclusive(vec![id.as_str().to_owned()], move |b| {
            crate::faults::step("modify: locked");
            let record = b
                .get(&id)?
                .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
            let limits = record.params.io_limits.apply(&params)?;
            let record = b.set_io_limits(&id, limits)?;
            apply(b, &record)?;
            Ok(record)
        })
        .await
    }

    /// Snapshot a volume; idempotent by name.
    pub async fn create_snapshot(&self, name: String, raw_source: &str) -> Result<SnapshotRecord> {
        crate::model::spec::validate_name(&name)?;
        if raw_source.is_empty() {
            return Err(Error::invalid("source_volume_id is required"));
        }
        let source = parse_known(raw_source)?;
        let keys = vec![format!("snapshot:{name}"), source.as_str().to_owned()];
        self.exclusive(keys, move |b| {
            crate::faults::step("snapshot: locked");
            if let Some(existing) = b.find_snapshot_by_name(&name)? {
                if existing.source_volume != source {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {name:?} already exists for volume {}",
                        existing.source_volume
                    )));
                }
                return Ok(existing);
            }
            let volume = b.get(&source)?.ok_or_else(|| Error::VolumeNotFound(source.to_string()))?;
            let snapshot = SnapshotRecord {
                id: SnapshotId::generate(),
                name,
                source_volume: source,
                size_bytes: volume.capacity_bytes,
                created_unix: now_unix(),
                group: None,
            };
            b.create_snapshot(&snapshot)?;
            tracing::debug!(snapshot_id = %snapshot.id, volume_id = %snapshot.source_volume, "snapshot created");
            Ok(snapshot)
        })
        .await
    }

    /// Deleting an unknown snapshot succeeds.
    pub async fn delete_snapshot(&self, raw_id: &str) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::invalid("snapshot_id is required"));
        }
        let Some(id) = SnapshotId::parse(raw_id) else {
            return Ok(());
        };
        let readers = self.readers.clone();
        self.exclusive(vec![id.as_str().to_owned()], move |b| {
            crate::faults::step("delete snapshot: locked");
            readers.check_unread(&id)?;
            if let Some(group) = b.get_snapshot(&id)?.and_then(|s| s.group) {
                return Err(Error::invalid(format!(
                    "snapshot {id} is part of group snapshot {}: it cannot be deleted alone; \
                     delete the group (DeleteVolumeGroupSnapshot)",
                    group.id
                )));
            }
            b.delete_snapshot(&id)
        })
        .await
    }

    /// Snapshots, optionally only one or only those of one volume.
    pub async fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        starting_token: &str,
        max_entries: i32,
    ) -> Result<(Vec<SnapshotRecord>, String)> {
        token::decode::<SnapshotId>(starting_token)?;
        let (snapshot_id, source) = (snapshot_id.to_owned(), source_volume_id.to_owned());
        let all = self
            .blocking(move |b| {
                let all = b.list_snapshots()?;
                // Members of a group whose cut never finished were never answered to anyone.
                let incomplete = group_snapshots::incomplete_groups(&all);
                Ok(all
                    .into_iter()
                    .filter(|s| s.group_id().is_none_or(|g| !incomplete.contains(g)))
                    .filter(|s| snapshot_id.is_empty() || s.id.as_str() == snapshot_id)
                    .filter(|s| source.is_empty() || s.source_volume.as_str() == source)
                    .collect::<Vec<_>>())
            })
            .await?;
        token::page(all, |s| &s.id, starting_token, max_entries)
    }

    /// Run `work` on the blocking pool holding `keys` until it ends, whatever happens to the
    /// caller (see [`Work`]).
    async fn exclusive<T: Send + 'static>(
        &self,
        keys: Vec<String>,
        work: impl FnOnce(&dyn Backend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.work
            .run(keys, run_blocking(self.backend.clone(), work))
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes a new volume needs to hold a copy of `source`.
fn source_size(b: &dyn Backend, source: &ContentSource) -> Result<u64> {
    match source {
        ContentSource::Snapshot(id) => b
            .get_snapshot(id)?
            .map(|s| s.size_bytes)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id} not found"))),
        ContentSource::Volume(id) => b
            .get(id)?
            .map(|v| v.capacity_bytes)
            .ok_or_else(|| Error::NotFound(format!("source volume {id} not found"))),
    }
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
    if req.source != existing.source {
        return Err(conflict(
            "it was created from another content source".to_owned(),
        ));
    }
    Ok(existing)
}

mod group_snapshots;
pub use group_snapshots::GroupSnapshot;
mod pulled;
pub use pulled::HeldSnapshot;

#[cfg(test)]
mod tests;
