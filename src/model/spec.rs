//! Validated, protobuf-free descriptions of what a request asks for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;
use crate::model::volume_size::CapacityRange;
use crate::model::{SnapshotId, VolumeId};

/// Filesystems Kennel formats and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub const DEFAULT: FsType = FsType::Ext4;

    /// Empty means "driver default".
    pub fn parse(raw: &str) -> Result<Option<FsType>> {
        match raw {
            "" => Ok(None),
            "ext4" => Ok(Some(FsType::Ext4)),
            "xfs" => Ok(Some(FsType::Xfs)),
            other => Err(Error::invalid(format!(
                "unsupported fs_type {other:?}: Kennel supports ext4 and xfs"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Smallest device mkfs accepts (xfs refuses anything under 300 MiB).
    pub fn minimum_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => crate::model::volume_size::MIB,
            FsType::Xfs => 300 * crate::model::volume_size::MIB,
        }
    }
}

/// How the workload sees the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AccessType {
    Block,
    Mount {
        fs_type: Option<FsType>,
        mount_flags: Vec<String>,
    },
}

/// The single-node access modes Kennel serves; MULTI_NODE modes never get here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    pub fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

impl Capability {
    pub fn fs_type(&self) -> Option<FsType> {
        match &self.access_type {
            AccessType::Mount { fs_type, .. } => *fs_type,
            AccessType::Block => None,
        }
    }

    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }
}

/// StorageClass parameters. Keys every backend understands are parsed here;
/// the rest belong to the backend, which refuses any key it does not know, so
/// a typo in a StorageClass is an error, not a silent default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeParams {
    /// Let mkfs discard the device first (off: on a preallocated image a
    /// discard punches holes and takes minutes on big volumes).
    pub mkfs_discard: bool,
    /// The claim this volume was made for (csi-provisioner --extra-create-metadata).
    pub pvc_name: Option<String>,
    pub pvc_namespace: Option<String>,
    pub pv_name: Option<String>,
    /// Backend-specific keys (LVM layout, device class...).
    #[serde(default)]
    pub backend: BTreeMap<String, String>,
    /// I/O limits: the mutable parameters (see `model::io_limits`).
    #[serde(default, skip_serializing_if = "IoLimits::is_empty")]
    pub io_limits: IoLimits,
}

pub const PARAM_MKFS_DISCARD: &str = "mkfsDiscard";
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PARAM_PV_NAME: &str = "csi.storage.k8s.io/pv/name";
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

impl VolumeParams {
    pub fn parse(raw: &BTreeMap<String, String>) -> Result<Self> {
        let mut params = VolumeParams::default();
        for (key, value) in raw {
            match key.as_str() {
                PARAM_MKFS_DISCARD => {
                    params.mkfs_discard = parse_bool(key, value)?;
                }
                PARAM_PVC_NAME => params.pvc_name = Some(value.clone()),
                PARAM_PVC_NAMESPACE => params.pvc_namespace = Some(value.clone()),
                PARAM_PV_NAME => params.pv_name = Some(value.clone()),
                // Reserved for Kubernetes and its sidecars (fstype, secret names...):
                // they may reach GetCapacity unfiltered and are not ours to judge.
                reserved if reserved.starts_with(RESERVED_PREFIX) => {}
                other => {
                    params.backend.insert(other.to_owned(), value.clone());
                }
            }
        }
        Ok(params)
    }

    /// Parameters that change the volume itself (not just where it came from):
    /// a repeated CreateVolume must agree on these.
    pub fn same_volume_as(&self, other: &VolumeParams) -> bool {
        self.mkfs_discard == other.mkfs_discard && self.backend == other.backend
    }

    /// Volume context handed back to the CO and on to NodeStage.
    pub fn to_context(&self) -> BTreeMap<String, String> {
        let mut ctx = self.backend.clone();
        if self.mkfs_discard {
            ctx.insert(PARAM_MKFS_DISCARD.to_owned(), "true".to_owned());
        }
        ctx
    }
}

/// The error for a StorageClass key a backend does not know.
pub fn unknown_param(key: &str, backend: &str, known: &[&str]) -> Error {
    let mut all = vec![PARAM_MKFS_DISCARD];
    all.extend_from_slice(known);
    Error::invalid(format!(
        "unknown StorageClass parameter {key:?} for the {backend} backend (known: {})",
        all.join(", ")
    ))
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::invalid(format!(
            "parameter {key:?} must be \"true\" or \"false\", got {value:?}"
        ))),
    }
}

/// The origin of a pre-populated volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

/// A validated CreateVolume request.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub params: VolumeParams,
    /// Segments the volume must be reachable from (any one of them).
    pub requisite: Vec<Segment>,
    /// Data to start from.
    pub source: Option<ContentSource>,
}

impl CreateRequest {
    /// The filesystem this volume will carry, if any capability names one.
    pub fn fs_type(&self) -> Option<FsType> {
        self.capabilities.iter().find_map(Capability::fs_type)
    }

    pub fn wants_block(&self) -> bool {
        self.capabilities.iter().any(Capability::is_block)
    }
}

/// Longest volume name Kennel accepts (Kubernetes PV names are at most 253).
pub const MAX_NAME_LEN: usize = 253;

pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("volume name is required"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "volume name is {} bytes; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid("volume name contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_keys_are_kept_apart_and_named_when_unknown() {
        let raw = BTreeMap::from([("mkfsDiscrad".to_owned(), "true".to_owned())]);
        let params = VolumeParams::parse(&raw).unwrap();
        assert_eq!(params.backend, raw);
        assert!(!params.same_volume_as(&VolumeParams::default()));
        let err = unknown_param("mkfsDiscrad", "loop", &[]).to_string();
        assert!(err.contains("mkfsDiscrad"), "{err}");
    }

    #[test]
    fn known_parameters_parse() {
        let raw = BTreeMap::from([
            (PARAM_MKFS_DISCARD.to_owned(), "true".to_owned()),
            (PARAM_PVC_NAME.to_owned(), "www-webserver-0".to_owned()),
        ]);
        let params = VolumeParams::parse(&raw).unwrap();
        assert!(params.mkfs_discard);
        assert_eq!(params.pvc_name.as_deref(), Some("www-webserver-0"));
        let bad = BTreeMap::from([(PARAM_MKFS_DISCARD.to_owned(), "yes".to_owned())]);
        assert!(VolumeParams::parse(&bad).is_err());
    }

    #[test]
    fn reserved_kubernetes_keys_are_not_backend_parameters() {
        let raw = BTreeMap::from([
            ("csi.storage.k8s.io/fstype".to_owned(), "xfs".to_owned()),
            (
                "csi.storage.k8s.io/provisioner-secret-name".to_owned(),
                "s".to_owned(),
            ),
            (PARAM_PV_NAME.to_owned(), "pvc-1".to_owned()),
        ]);
        let params = VolumeParams::parse(&raw).expect("parse");
        assert!(params.backend.is_empty());
        assert_eq!(params.pv_name.as_deref(), Some("pvc-1"));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(254)).is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name("pvc-0b0c1d2e").is_ok());
    }

    #[test]
    fn fs_types() {
        assert_eq!(FsType::parse("").unwrap(), None);
        assert_eq!(FsType::parse("xfs").unwrap(), Some(FsType::Xfs));
        assert!(FsType::parse("ntfs").is_err());
    }
}

/// A topology segment, e.g. `{topology.kennel.csi.dev/node: node-1}`.
pub type Segment = BTreeMap<String, String>;

/// A segment is satisfied by this node when every key it names has our value.
pub fn segment_matches(wanted: &Segment, ours: &Segment) -> bool {
    wanted.iter().all(|(k, v)| ours.get(k) == Some(v))
}

/// A path on the host named by a request: absolute, normalized, no `..`.
pub fn host_path(raw: &str, field: &str) -> Result<std::path::PathBuf> {
    use std::path::{Component, Path};
    if raw.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    let path = Path::new(raw);
    let normal = path.is_absolute()
        && path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
        && path.components().count() > 1
        && !raw.contains('\0');
    if !normal {
        return Err(Error::invalid(format!(
            "{field} must be an absolute path without '..', got {raw:?}"
        )));
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn host_paths_are_checked() {
        assert!(host_path("", "target_path").is_err());
        assert!(host_path("relative/x", "target_path").is_err());
        assert!(host_path("/var/../etc", "target_path").is_err());
        assert!(host_path("/", "target_path").is_err());
        assert!(host_path("/var/lib/kubelet/x", "target_path").is_ok());
    }

    #[test]
    fn segments_match_on_every_named_key() {
        let ours = Segment::from([("topology.kennel.csi.dev/node".into(), "n1".into())]);
        let same = Segment::from([("topology.kennel.csi.dev/node".into(), "n1".into())]);
        assert!(segment_matches(&same, &ours));
        assert!(segment_matches(&Segment::new(), &ours));
        let other = Segment::from([("topology.kennel.csi.dev/node".into(), "n2".into())]);
        assert!(!segment_matches(&other, &ours));
        let zone = Segment::from([("zone".into(), "a".into())]);
        assert!(!segment_matches(&zone, &ours));
    }
}
