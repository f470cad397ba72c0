//! Migrate on drain, as it is written in the cluster: the annotations that carry a migration's
//! state from one step to the next (so a restarted controller resumes, never replans from
//! memory) and the names of the objects a migration makes. The planner is
//! `policy::migration`; `kennel ctl` reads the same records to show where a volume's data is.

use k8s_openapi::api::core::v1::PersistentVolume;
use serde::{Deserialize, Serialize};

/// StatefulSet opt-in: `migrate` moves a claim whose node is drained to another node.
pub const ON_DRAIN_ANNOTATION: &str = "kennel.csi.dev/on-drain";
/// On the PV being moved away from: a [`Migration`] as JSON.
pub const MIGRATION_ANNOTATION: &str = "kennel.csi.dev/migration";
/// On the PV the data is copied into: a [`Copy`] as JSON.
pub const COPY_ANNOTATION: &str = "kennel.csi.dev/migration-copy";
/// On the migration's VolumeSnapshot and staging claim: the UID of the PV moved away from.
pub const MIGRATION_LABEL: &str = "kennel.csi.dev/migration-of";
/// The annotation the scheduler uses to tell csi-provisioner which node to provision on.
pub const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";

/// The steps of a migration, in order: each is one write, and the controller can be stopped
/// after any of them (src/faults.rs) to show that a restart resumes there.
pub mod step {
    pub const RETAINED: &str = "migration: retained";
    pub const SNAPSHOT_REQUESTED: &str = "migration: snapshot requested";
    pub const COPY_REQUESTED: &str = "migration: copy requested";
    pub const COPY_KEPT: &str = "migration: copy kept";
    pub const STAGING_RELEASED: &str = "migration: staging released";
    pub const PREBOUND: &str = "migration: prebound";
    pub const CLAIM_REPLACED: &str = "migration: claim replaced";
    pub const SNAPSHOT_DELETED: &str = "migration: snapshot deleted";
    pub const COPY_POLICY_RESTORED: &str = "migration: copy policy restored";
    pub const OLD_VOLUME_RELEASED: &str = "migration: old volume released";
}

/// Every step, in the order a migration takes them.
pub const STEPS: [&str; 10] = [
    step::RETAINED,
    step::SNAPSHOT_REQUESTED,
    step::COPY_REQUESTED,
    step::COPY_KEPT,
    step::STAGING_RELEASED,
    step::PREBOUND,
    step::CLAIM_REPLACED,
    step::SNAPSHOT_DELETED,
    step::COPY_POLICY_RESTORED,
    step::OLD_VOLUME_RELEASED,
];

/// A claim's move from one node to another, recorded on its old PV when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// The claim's name (its namespace is the PV's claimRef's).
    pub claim: String,
    pub from: String,
    pub to: String,
    /// The Pending pod the migration is for: a pod replaced since may have run on the old
    /// node and written after the snapshot, so the migration is undone instead.
    pub pod_uid: String,
    /// RFC 3339.
    pub since: String,
    /// The old PV's reclaim policy before the migration set it to Retain; the new PV gets it.
    pub reclaim_policy: String,
}

/// Recorded on the PV the data was copied into, when the migration takes it over from the
/// staging claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Copy {
    /// The PV moved away from.
    pub source: String,
    /// The staging claim's UID: pointing the PV back at it releases the PV for deletion.
    pub staging_uid: String,
}

/// The name of a migration's VolumeSnapshot and staging claim, from the old PV's UID: a DNS
/// subdomain whatever the PV's name, and new for every volume moved.
pub fn staging_name(source_uid: &str) -> String {
    format!("kennel-migrate-{source_uid}")
}

/// The UID of the PV a migration's staging claim (or snapshot) named `name` moves away from.
pub fn staging_source(name: &str) -> Option<&str> {
    name.strip_prefix("kennel-migrate-")
}

fn annotation<'a>(pv: &'a PersistentVolume, key: &str) -> Option<&'a str> {
    pv.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The migration recorded on `pv`, if it is being moved away from.
pub fn migration_of(pv: &PersistentVolume) -> Option<Migration> {
    serde_json::from_str(annotation(pv, MIGRATION_ANNOTATION)?).ok()
}

/// The copy record of `pv`, if a migration copied data into it and has not finished.
pub fn copy_of(pv: &PersistentVolume) -> Option<Copy> {
    serde_json::from_str(annotation(pv, COPY_ANNOTATION)?).ok()
}

/// JSON of a record, for an annotation value.
pub fn to_annotation<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn records_round_trip_through_annotations() {
        let m = Migration {
            claim: "www-web-0".into(),
            from: "node-a".into(),
            to: "node-b".into(),
            pod_uid: "u1".into(),
            since: "2026-12-03T00:00:00Z".into(),
            reclaim_policy: "Delete".into(),
        };
        let pv = PersistentVolume {
            metadata: ObjectMeta {
                annotations: Some(
                    [(MIGRATION_ANNOTATION.to_owned(), to_annotation(&m))]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(migration_of(&pv), Some(m));
        assert_eq!(copy_of(&pv), None);
        let garbled = PersistentVolume {
            metadata: ObjectMeta {
                annotations: Some(
                    [(MIGRATION_ANNOTATION.to_owned(), "{".to_owned())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(migration_of(&garbled), None);
        let name = staging_name("0b5e7d2c-1f4e-4c43-9a55-3f6a3a2b9e10");
        assert_eq!(name, "kennel-migrate-0b5e7d2c-1f4e-4c43-9a55-3f6a3a2b9e10");
        assert_eq!(
            staging_source(&name),
            Some("0b5e7d2c-1f4e-4c43-9a55-3f6a3a2b9e10")
        );
        assert_eq!(staging_source("www-web-0"), None);
    }
}
