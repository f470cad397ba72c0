//! Volume group snapshots (the CSI GroupController): several volumes of this node cut at one
//! instant, for applications whose state spans volumes (a database and its log, a replicated
//! set).
//!
//! - **Consistency**: the backend freezes the filesystems of every staged member together,
//!   cuts every member, then thaws them all (see `Backend::create_group_snapshot`). Writers
//!   see one instant across the group. A raw block member has no filesystem to freeze: it
//!   gets what its application has written to the device when it is cut.
//! - **One node**: Kennel's controller runs on each node and sees only that node's volumes.
//!   A member it does not have is on another node (or nowhere): the group is refused with
//!   FAILED_PRECONDITION, because no node can freeze another node's filesystems.
//! - **Storage**: a group is stored nowhere but in its members: each member snapshot carries
//!   the group's ID, its name and how many members it was cut with, so the group survives a
//!   restart with its members and needs no record of its own.
//! - **All or nothing**: the backend removes the members it made when a cut fails. A driver
//!   killed mid-cut may leave some members behind; they are never shown (a group with fewer
//!   members than it was cut with is incomplete: ListSnapshots hides its members and
//!   GetVolumeGroupSnapshot answers NOT_FOUND), and the retry under the same name removes
//!   them before it cuts the group again, at a new instant (members cut at different instants
//!   would not be a group snapshot). DeleteVolumeGroupSnapshot removes them too.
//! - **Serialized**: a create holds its name and every source volume for its whole run, so a
//!   retry meanwhile answers ABORTED and a deletion of a member volume waits; a deletion holds
//!   the group and every member snapshot, so a restore from a member finishes first.
//! - **snapshot_ids** in Get and Delete are checked when given (INVALID_ARGUMENT on a
//!   mismatch). An empty list is not: a sidecar that lost its record of the members must still
//!   be able to delete the group.

use std::collections::{BTreeMap, BTreeSet};

use super::{now_unix, parse_known, Controller};
use crate::backend::{Backend, GroupMembership, SnapshotRecord};
use crate::error::{Error, Result};
use crate::model::{GroupSnapshotId, SnapshotId, VolumeId};

/// A group snapshot as its members describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub id: GroupSnapshotId,
    pub name: String,
    /// Sorted by ID.
    pub members: Vec<SnapshotRecord>,
    pub created_unix: u64,
}

impl GroupSnapshot {
    fn sources(&self) -> BTreeSet<&VolumeId> {
        self.members.iter().map(|m| &m.source_volume).collect()
    }
}

/// Members of one group found on the backend, and whether they are all there.
struct Found {
    members: Vec<SnapshotRecord>,
    complete: bool,
}

impl Found {
    fn group(self) -> Option<GroupSnapshot> {
        let first = self.members.first()?.clone();
        Some(GroupSnapshot {
            id: first.group_id()?.clone(),
            name: first.name,
            created_unix: first.created_unix,
            members: self.members,
        })
    }
}

/// Every group on the backend that `keep` admits, by ID.
fn groups(
    b: &dyn Backend,
    keep: impl Fn(&SnapshotRecord) -> bool,
) -> Result<BTreeMap<GroupSnapshotId, Found>> {
    let mut found: BTreeMap<GroupSnapshotId, Found> = BTreeMap::new();
    for snapshot in b.list_snapshots()? {
        let Some(group) = snapshot.group.clone() else {
            continue;
        };
        if !keep(&snapshot) {
            continue;
        }
        let entry = found.entry(group.id).or_insert(Found {
            members: Vec::new(),
            complete: false,
        });
        entry.members.push(snapshot);
        entry.complete = entry.members.len() == group.members as usize;
    }
    Ok(found)
}

fn group_by_id(b: &dyn Backend, id: &GroupSnapshotId) -> Result<Option<Found>> {
    Ok(groups(b, |s| s.group_id() == Some(id))?.remove(id))
}

pub use crate::backend::incomplete_groups;

impl Controller {
    /// Cut `raw_sources` together under `name`; idempotent by name.
    pub async fn create_group_snapshot(
        &self,
        name: String,
        raw_sources: &[String],
    ) -> Result<GroupSnapshot> {
        crate::model::spec::validate_name(&name)?;
        if raw_sources.is_empty() {
            return Err(Error::invalid("source_volume_ids are required"));
        }
        let mut sources = raw_sources
            .iter()
            .map(|raw| parse_known(raw))
            .collect::<Result<Vec<_>>>()?;
        sources.sort();
        if let Some(twice) = sources.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(format!(
                "source_volume_ids name volume {} twice",
                twice[0]
            )));
        }
        // Members of an earlier cut under this name that never finished: removed below, under
        // their own keys too, so a deletion of them running meanwhile finishes first.
        let lookup = name.clone();
        let debris: BTreeSet<SnapshotId> = self
            .blocking(move |b| {
                Ok(groups(b, |s| s.name == lookup)?
                    .into_values()
                    .filter(|f| !f.complete)
                    .flat_map(|f| f.members.into_iter().map(|m| m.id))
                    .collect())
            })
            .await?;
        // Fixed order, the name, the snapshots, the volumes (each sorted): creates and
        // deletions never wait for each other in a circle.
        let mut keys = vec![format!("groupsnapshot:{name}")];
        keys.extend(debris.iter().map(|id| id.as_str().to_owned()));
        keys.extend(sources.iter().map(|id| id.as_str().to_owned()));
        let node = self.identity.node_id.clone();
        self.exclusive(keys, move |b| {
            crate::faults::step("group snapshot: locked");
            for (_, found) in groups(b, |s| s.name == name)? {
                if !found.complete {
                    // Never answered to anyone: the retry cuts the group again, whole.
                    for member in found.members.iter().filter(|m| debris.contains(&m.id)) {
                        b.delete_snapshot(&member.id)?;
                    }
                    continue;
                }
                let Some(existing) = found.group() else {
                    continue;
                };
                if existing.sources() != sources.iter().collect() {
                    return Err(Error::AlreadyExists(format!(
                        "group snapshot {name:?} already exists for volumes {}",
                        existing
                            .sources()
                            .iter()
                            .map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                return Ok(existing);
            }
            let mut volumes = Vec::with_capacity(sources.len());
            for id in &sources {
                volumes.push(b.get(id)?.ok_or_else(|| not_on_this_node(id, &node))?);
            }
            let id = GroupSnapshotId::generate();
            let created_unix = now_unix();
            let membership = GroupMembership {
                id: id.clone(),
                members: volumes.len() as u32,
            };
            let mut members: Vec<SnapshotRecord> = volumes
                .iter()
                .map(|v| SnapshotRecord {
                    id: SnapshotId::generate(),
                    name: name.clone(),
                    source_volume: v.id.clone(),
                    size_bytes: v.capacity_bytes,
                    created_unix,
                    group: Some(membership.clone()),
                })
                .collect();
            members.sort_by(|a, b| a.id.cmp(&b.id));
            b.create_group_snapshot(&members)?;
            tracing::debug!(group_snapshot_id = %id, members = members.len(), "group snapshot created");
            Ok(GroupSnapshot {
                id,
                name,
                members,
                created_unix,
            })
        })
        .await
    }

    /// The group, checked against the member IDs the caller has (when it gives them).
    pub async fn get_group_snapshot(
        &self,
        raw_id: &str,
        snapshot_ids: &[String],
    ) -> Result<GroupSnapshot> {
        if raw_id.is_empty() {
            return Err(Error::invalid("group_snapshot_id is required"));
        }
        let not_found = || Error::NotFound(format!("group snapshot {raw_id:?} not found"));
        let id = GroupSnapshotId::parse(raw_id).ok_or_else(not_found)?;
        let found = self.blocking(move |b| group_by_id(b, &id)).await?;
        let group = found
            .filter(|f| f.complete)
            .and_then(Found::group)
            .ok_or_else(not_found)?;
        if !snapshot_ids.is_empty() {
            let mut asked: Vec<&str> = snapshot_ids.iter().map(String::as_str).collect();
            asked.sort_unstable();
            let has: Vec<&str> = group.members.iter().map(|m| m.id.as_str()).collect();
            if asked != has {
                return Err(mismatch(&group.id, &has));
            }
        }
        Ok(group)
    }

    /// Delete the group and every member; an unknown group succeeds.
    pub async fn delete_group_snapshot(&self, raw_id: &str, snapshot_ids: &[String]) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::invalid("group_snapshot_id is required"));
        }
        let Some(id) = GroupSnapshotId::parse(raw_id) else {
            return Ok(());
        };
        let asked = snapshot_ids
            .iter()
            .map(|raw| {
                SnapshotId::parse(raw).ok_or_else(|| {
                    Error::invalid(format!("snapshot_ids: {raw:?} is no Kennel snapshot ID"))
                })
            })
            .collect::<Result<BTreeSet<_>>>()?;
        let lookup = id.clone();
        let Some(found) = self.blocking(move |b| group_by_id(b, &lookup)).await? else {
            return Ok(());
        };
        // The group and each member, so a restore from a member finishes first.
        let mut keys = vec![id.as_str().to_owned()];
        keys.extend(found.members.iter().map(|m| m.id.as_str().to_owned()));
        let readers = self.readers.clone();
        self.exclusive(keys, move |b| {
            crate::faults::step("delete group snapshot: locked");
            let Some(found) = group_by_id(b, &id)? else {
                return Ok(());
            };
            for member in &found.members {
                readers.check_unread(&member.id)?;
            }
            let members: BTreeSet<SnapshotId> =
                found.members.iter().map(|m| m.id.clone()).collect();
            if !asked.is_empty() {
                // After an interrupted deletion some listed members are gone: that is no
                // mismatch. A member left out, or a listed snapshot of another group, is.
                let foreign = asked
                    .iter()
                    .filter(|s| !members.contains(*s))
                    .map(|s| b.get_snapshot(s))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .any(|s| s.is_some());
                if foreign || !members.is_subset(&asked) {
                    let has: Vec<&str> = members.iter().map(SnapshotId::as_str).collect();
                    return Err(mismatch(&id, &has));
                }
            }
            for member in &members {
                b.delete_snapshot(member)?;
            }
            tracing::debug!(group_snapshot_id = %id, "group snapshot deleted");
            Ok(())
        })
        .await
    }
}

fn mismatch(id: &GroupSnapshotId, has: &[&str]) -> Error {
    Error::invalid(format!(
        "snapshot_ids do not match the members of group snapshot {id}: {}",
        has.join(", ")
    ))
}

fn not_on_this_node(id: &VolumeId, node: &str) -> Error {
    Error::Precondition(format!(
        "volume {id} is not on node {node}: every volume of a group snapshot must be on one node, \
         because Kennel's storage is node-local and a node can only freeze its own filesystems \
         (or the volume does not exist); snapshot the volumes of each node as a group of its own"
    ))
}
