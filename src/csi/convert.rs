//! Protobuf → validated domain values, and back.

use std::collections::BTreeMap;

use crate::backend::{SnapshotRecord, VolumeRecord};
use crate::csi::pb;
use crate::csi::snapshot_handle::{self, Located};
use crate::error::{Error, Result};
use crate::model::spec::{AccessMode, AccessType, Capability, FsType, Segment};
use crate::model::volume_size::CapacityRange;
use crate::model::ContentSource;
use crate::model::{SnapshotId, VolumeId};
use crate::peer::NodeName;
use crate::volume::controller_ops::GroupSnapshot;

use pb::volume_capability::access_mode::Mode;

/// Why a capability cannot be used.
#[derive(Debug)]
pub enum CapabilityError {
    /// The request is malformed (no access type, no mode): INVALID_ARGUMENT everywhere.
    Malformed(Error),
    /// Well-formed but not something Kennel serves (MULTI_NODE, unknown fs).
    Unsupported(Error),
}

impl From<CapabilityError> for Error {
    fn from(e: CapabilityError) -> Error {
        match e {
            CapabilityError::Malformed(e) | CapabilityError::Unsupported(e) => e,
        }
    }
}

/// The group a Filesystem publication's files are given (`volume_mount_group`,
/// a numeric GID as the kubelet sends the pod's fsGroup); `None` when unset.
pub fn mount_group(cap: Option<&pb::VolumeCapability>) -> Result<Option<u32>> {
    use pb::volume_capability::AccessType as Pb;
    let Some(Pb::Mount(m)) = cap.and_then(|c| c.access_type.as_ref()) else {
        return Ok(None);
    };
    if m.volume_mount_group.is_empty() {
        return Ok(None);
    }
    m.volume_mount_group
        .parse::<u32>()
        .ok()
        .filter(|gid| *gid != u32::MAX)
        .map(Some)
        .ok_or_else(|| {
            Error::invalid(format!(
                "volume_mount_group {:?} is not a numeric group ID",
                m.volume_mount_group
            ))
        })
}

pub fn capability(cap: &pb::VolumeCapability) -> std::result::Result<Capability, CapabilityError> {
    use pb::volume_capability::AccessType as Pb;
    let access_type = match &cap.access_type {
        None => {
            return Err(CapabilityError::Malformed(Error::invalid(
                "volume capability needs an access type (block or mount)",
            )))
        }
        Some(Pb::Block(_)) => AccessType::Block,
        Some(Pb::Mount(m)) => AccessType::Mount {
            fs_type: FsType::parse(&m.fs_type).map_err(CapabilityError::Unsupported)?,
            mount_flags: m.mount_flags.clone(),
        },
    };
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| {
            CapabilityError::Malformed(Error::invalid("volume capability needs an access mode"))
        })?
        .mode;
    let access_mode = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(
            m @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => {
            return Err(CapabilityError::Unsupported(Error::invalid(format!(
                "access mode {} is not supported: Kennel volumes are local to one node",
                m.as_str_name()
            ))))
        }
        Ok(Mode::Unknown) | Err(_) => {
            return Err(CapabilityError::Malformed(Error::invalid(format!(
                "unknown access mode {mode}"
            ))))
        }
    };
    Ok(Capability {
        access_type,
        access_mode,
    })
}

/// Every capability of a request, all of which must be supported.
pub fn capabilities(caps: &[pb::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::invalid("volume_capabilities are required"));
    }
    caps.iter()
        .map(|c| capability(c).map_err(Error::from))
        .collect()
}

pub fn required_capability(cap: Option<&pb::VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::invalid("volume_capability is required"))?;
    Ok(capability(cap)?)
}

pub fn capacity_range(range: Option<&pb::CapacityRange>) -> Result<CapacityRange> {
    range.map_or(Ok(CapacityRange::default()), |r| {
        CapacityRange::new(r.required_bytes, r.limit_bytes)
    })
}

pub fn topology(segment: &Segment) -> pb::Topology {
    pb::Topology {
        segments: segment.clone(),
    }
}

pub fn volume(
    record: &VolumeRecord,
    topology_segment: &Segment,
    context: BTreeMap<String, String>,
) -> pb::Volume {
    pb::Volume {
        capacity_bytes: record.capacity_bytes as i64,
        volume_id: record.id.to_string(),
        volume_context: context,
        content_source: record
            .source
            .as_ref()
            .map(|s| content_source_pb(s, &record.node_id)),
        accessible_topology: vec![topology(topology_segment)],
    }
}

/// What a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedSource {
    /// A snapshot or volume on this node.
    Here(ContentSource),
    /// A snapshot another node holds: its bytes must be pulled from there.
    Peer {
        snapshot: SnapshotId,
        node: NodeName,
    },
}

/// A content source named by the request, for a volume on `this_node`. IDs that cannot exist
/// are NOT_FOUND.
pub fn content_source(
    source: &pb::VolumeContentSource,
    this_node: &str,
) -> Result<RequestedSource> {
    use pb::volume_content_source::Type;
    match &source.r#type {
        Some(Type::Snapshot(s)) => match snapshot_handle::locate(&s.snapshot_id, this_node) {
            Some(Located::Here(id)) => Ok(RequestedSource::Here(ContentSource::Snapshot(id))),
            Some(Located::Elsewhere { id, node }) => {
                Ok(RequestedSource::Peer { snapshot: id, node })
            }
            None => Err(Error::NotFound(format!(
                "snapshot {:?} not found",
                s.snapshot_id
            ))),
        },
        Some(Type::Volume(v)) => VolumeId::parse(&v.volume_id)
            .map(|id| RequestedSource::Here(ContentSource::Volume(id)))
            .ok_or_else(|| Error::NotFound(format!("source volume {:?} not found", v.volume_id))),
        None => Err(Error::invalid(
            "volume_content_source names neither a snapshot nor a volume",
        )),
    }
}

pub fn content_source_pb(source: &ContentSource, node: &str) -> pb::VolumeContentSource {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let r#type = match source {
        ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot_handle::handle(id, node),
        }),
        ContentSource::Volume(id) => Type::Volume(VolumeSource {
            volume_id: id.to_string(),
        }),
    };
    pb::VolumeContentSource {
        r#type: Some(r#type),
    }
}

/// A snapshot held by `node` (this node), as the CO sees it.
pub fn snapshot(record: &SnapshotRecord, node: &str) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: bytes(record.size_bytes),
        snapshot_id: snapshot_handle::handle(&record.id, node),
        source_volume_id: record.source_volume.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: record.created_unix as i64,
            nanos: 0,
        }),
        ready_to_use: true,
        group_snapshot_id: record
            .group_id()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

pub fn group_snapshot(group: &GroupSnapshot, node: &str) -> pb::VolumeGroupSnapshot {
    pb::VolumeGroupSnapshot {
        group_snapshot_id: group.id.to_string(),
        snapshots: group.members.iter().map(|s| snapshot(s, node)).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: group.created_unix as i64,
            nanos: 0,
        }),
        ready_to_use: true,
    }
}

/// VolumeSnapshotClass parameters: only csi-snapshotter's metadata is known.
pub fn snapshot_params(params: &BTreeMap<String, String>) -> Result<()> {
    const METADATA_PREFIX: &str = "csi.storage.k8s.io/volumesnapshot";
    match params.keys().find(|k| !k.starts_with(METADATA_PREFIX)) {
        Some(key) => Err(Error::invalid(format!(
            "unknown VolumeSnapshotClass parameter {key:?}"
        ))),
        None => Ok(()),
    }
}

/// VolumeGroupSnapshotClass parameters: only csi-snapshotter's metadata of the group
/// (`csi.storage.k8s.io/volumegroupsnapshot/{name,namespace}`,
/// `csi.storage.k8s.io/volumegroupsnapshotcontent/name`, with `--extra-create-metadata`).
pub fn group_snapshot_params(params: &BTreeMap<String, String>) -> Result<()> {
    const METADATA_PREFIX: &str = "csi.storage.k8s.io/volumegroupsnapshot";
    match params.keys().find(|k| !k.starts_with(METADATA_PREFIX)) {
        Some(key) => Err(Error::invalid(format!(
            "unknown VolumeGroupSnapshotClass parameter {key:?}"
        ))),
        None => Ok(()),
    }
}

/// How long the caller waits for the answer, from gRPC's `grpc-timeout` header (an integer and
/// a unit: H, M, S, m, u, n).
pub fn call_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Capacity values on the wire are int64.
pub fn bytes(value: u64) -> i64 {
    value.min(i64::MAX as u64) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        use std::time::Duration;
        let deadline = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            call_deadline(&m)
        };
        assert_eq!(deadline("300S"), Some(Duration::from_secs(300)));
        assert_eq!(deadline("2M"), Some(Duration::from_secs(120)));
        assert_eq!(deadline("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(deadline("5x"), None);
        assert_eq!(deadline("S"), None);
        assert_eq!(call_deadline(&tonic::metadata::MetadataMap::new()), None);
    }

    fn params(keys: &[&str]) -> BTreeMap<String, String> {
        keys.iter()
            .map(|k| (k.to_string(), "x".to_owned()))
            .collect()
    }

    #[test]
    fn group_snapshots_take_csi_snapshotters_group_metadata_only() {
        let metadata = params(&[
            "csi.storage.k8s.io/volumegroupsnapshot/name",
            "csi.storage.k8s.io/volumegroupsnapshot/namespace",
            "csi.storage.k8s.io/volumegroupsnapshotcontent/name",
        ]);
        assert!(group_snapshot_params(&metadata).is_ok());
        assert!(snapshot_params(&metadata).is_err());
        let err = group_snapshot_params(&params(&["thin"])).unwrap_err();
        assert!(err.to_string().contains("\"thin\""), "{err}");
        assert!(snapshot_params(&params(&["csi.storage.k8s.io/volumesnapshot/name"])).is_ok());
    }
    use pb::volume_capability::{
        AccessMode as PbMode, AccessType as PbType, BlockVolume, MountVolume,
    };

    fn cap(access_type: Option<PbType>, mode: Mode) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type,
            access_mode: Some(PbMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn single_node_modes_are_accepted() {
        let c = capability(&cap(
            Some(PbType::Block(BlockVolume {})),
            Mode::SingleNodeWriter,
        ))
        .expect("test setup");
        assert!(c.is_block());
        let mount = PbType::Mount(MountVolume {
            fs_type: "xfs".into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        });
        let c = capability(&cap(Some(mount), Mode::SingleNodeReaderOnly)).expect("test setup");
        assert_eq!(c.fs_type(), Some(FsType::Xfs));
        assert!(c.access_mode.read_only());
    }

    #[test]
    fn multi_node_is_unsupported_and_missing_fields_are_malformed() {
        let block = Some(PbType::Block(BlockVolume {}));
        assert!(matches!(
            capability(&cap(block.clone(), Mode::MultiNodeMultiWriter)),
            Err(CapabilityError::Unsupported(_))
        ));
        assert!(matches!(
            capability(&cap(None, Mode::SingleNodeWriter)),
            Err(CapabilityError::Malformed(_))
        ));
        assert!(matches!(
            capability(&cap(block, Mode::Unknown)),
            Err(CapabilityError::Malformed(_))
        ));
        assert!(capabilities(&[]).is_err());
    }
}
