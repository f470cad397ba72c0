//! Orphan accounting for one node (pure): volumes in the node's backend that
//! no PersistentVolume references, and Kennel PVs on the node whose volume is
//! gone. Deleting orphans is opt-in and only after they stayed orphaned for a
//! grace period (a volume is briefly PV-less between CreateVolume and the
//! provisioner creating its PV).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;

use crate::topology::TOPOLOGY_KEY;

/// Attribute the driver records with each volume: the node holding it.
pub const ATTR_NODE: &str = "kennel.csi.dev/node";

/// A volume as the node's driver lists it (CSI ListVolumes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendVolume {
    pub volume_id: String,
    /// `namespace/name` of the claim it was made for, when recorded.
    pub claim: Option<String>,
    pub capacity_bytes: i64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct OrphanReport {
    /// Volumes with no PV.
    pub orphans: Vec<BackendVolume>,
    /// Names of bound or available Kennel PVs on this node whose volume is gone.
    pub missing: Vec<String>,
    /// Orphans past the grace period, to delete (only when deletion is enabled).
    pub delete: Vec<String>,
}

/// Remembers since when each volume has been orphaned (in memory: a restart
/// only delays deletion, never hastens it).
#[derive(Debug, Default)]
pub struct OrphanClock {
    first_seen: BTreeMap<String, Instant>,
}

pub fn plan(
    volumes: &[BackendVolume],
    pvs: &[PersistentVolume],
    driver: &str,
    node: &str,
    clock: &mut OrphanClock,
    now: Instant,
    delete_grace: Option<Duration>,
) -> OrphanReport {
    let ours: Vec<&PersistentVolume> = pvs
        .iter()
        .filter(|pv| csi_driver(pv) == Some(driver))
        .collect();
    let referenced: BTreeSet<&str> = ours.iter().filter_map(|pv| volume_handle(pv)).collect();
    let present: BTreeSet<&str> = volumes.iter().map(|v| v.volume_id.as_str()).collect();

    let orphans: Vec<BackendVolume> = volumes
        .iter()
        .filter(|v| !referenced.contains(v.volume_id.as_str()))
        .cloned()
        .collect();
    clock
        .first_seen
        .retain(|id, _| orphans.iter().any(|o| &o.volume_id == id));
    for orphan in &orphans {
        clock
            .first_seen
            .entry(orphan.volume_id.clone())
            .or_insert(now);
    }
    let delete = match delete_grace {
        Some(grace) => orphans
            .iter()
            .filter(|o| {
                clock
                    .first_seen
                    .get(&o.volume_id)
                    .is_some_and(|since| now.duration_since(*since) >= grace)
            })
            .map(|o| o.volume_id.clone())
            .collect(),
        None => Vec::new(),
    };
    let missing = ours
        .iter()
        .filter(|pv| pinned_to(pv) == Some(node))
        .filter(|pv| matches!(phase(pv), Some("Bound" | "Available")))
        .filter(|pv| volume_handle(pv).is_some_and(|h| !present.contains(h)))
        .filter_map(|pv| pv.metadata.name.clone())
        .collect();
    OrphanReport {
        orphans,
        missing,
        delete,
    }
}

fn csi_driver(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.csi.as_ref().map(|c| c.driver.as_str())
}

fn volume_handle(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .csi
        .as_ref()
        .map(|c| c.volume_handle.as_str())
}

fn phase(pv: &PersistentVolume) -> Option<&str> {
    pv.status.as_ref()?.phase.as_deref()
}

/// The node a PV's data lives on: the driver's attribute, else its node affinity.
pub fn pinned_to(pv: &PersistentVolume) -> Option<&str> {
    let spec = pv.spec.as_ref()?;
    if let Some(node) = spec
        .csi
        .as_ref()
        .and_then(|c| c.volume_attributes.as_ref())
        .and_then(|a| a.get(ATTR_NODE))
    {
        return Some(node);
    }
    spec.node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.key == TOPOLOGY_KEY && e.operator == "In")
        .and_then(|e| e.values.as_ref()?.first())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        PersistentVolumeSpec, PersistentVolumeStatus, VolumeNodeAffinity,
    };

    const DRIVER: &str = "kennel.csi.dev";

    fn pv(name: &str, driver: &str, handle: &str, node: &str, phase: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: driver.into(),
                    volume_handle: handle.into(),
                    ..Default::default()
                }),
                node_affinity: Some(VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: TOPOLOGY_KEY.into(),
                                operator: "In".into(),
                                values: Some(vec![node.into()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                }),
                ..Default::default()
            }),
            status: Some(PersistentVolumeStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn vol(id: &str) -> BackendVolume {
        BackendVolume {
            volume_id: id.into(),
            claim: Some(format!("default/{id}-claim")),
            capacity_bytes: 1,
        }
    }

    #[test]
    fn volumes_without_pv_are_orphans_and_pvs_without_volume_are_missing() {
        let volumes = [vol("kv-a"), vol("kv-b")];
        let pvs = [
            pv("pv-a", DRIVER, "kv-a", "n1", "Bound"),
            pv("pv-c", DRIVER, "kv-c", "n1", "Bound"),
            pv("pv-d", DRIVER, "kv-d", "n2", "Bound"),
            pv("pv-e", DRIVER, "kv-e", "n1", "Released"),
            pv("pv-b-foreign", "other.csi", "kv-b", "n1", "Bound"),
        ];
        let mut clock = OrphanClock::default();
        let report = plan(
            &volumes,
            &pvs,
            DRIVER,
            "n1",
            &mut clock,
            Instant::now(),
            None,
        );
        assert_eq!(report.orphans, vec![vol("kv-b")]);
        // pv-d lives on another node; pv-e is being released by its provisioner.
        assert_eq!(report.missing, vec!["pv-c".to_owned()]);
        assert!(report.delete.is_empty(), "deletion is opt-in");
    }

    #[test]
    fn orphans_are_deleted_only_after_the_grace_period() {
        let volumes = [vol("kv-a")];
        let grace = Some(Duration::from_secs(600));
        let mut clock = OrphanClock::default();
        let t0 = Instant::now();
        assert!(plan(&volumes, &[], DRIVER, "n1", &mut clock, t0, grace)
            .delete
            .is_empty());
        let early = t0 + Duration::from_secs(599);
        assert!(plan(&volumes, &[], DRIVER, "n1", &mut clock, early, grace)
            .delete
            .is_empty());
        let late = t0 + Duration::from_secs(600);
        assert_eq!(
            plan(&volumes, &[], DRIVER, "n1", &mut clock, late, grace).delete,
            vec!["kv-a".to_owned()]
        );
    }

    #[test]
    fn a_pv_appearing_resets_the_clock() {
        let volumes = [vol("kv-a")];
        let grace = Some(Duration::from_secs(60));
        let mut clock = OrphanClock::default();
        let t0 = Instant::now();
        plan(&volumes, &[], DRIVER, "n1", &mut clock, t0, grace);
        let bound = [pv("pv-a", DRIVER, "kv-a", "n1", "Bound")];
        let t1 = t0 + Duration::from_secs(30);
        assert!(plan(&volumes, &bound, DRIVER, "n1", &mut clock, t1, grace)
            .orphans
            .is_empty());
        // The PV is gone again: the orphan clock starts over.
        let t2 = t0 + Duration::from_secs(70);
        assert!(plan(&volumes, &[], DRIVER, "n1", &mut clock, t2, grace)
            .delete
            .is_empty());
        let t3 = t2 + Duration::from_secs(60);
        assert_eq!(
            plan(&volumes, &[], DRIVER, "n1", &mut clock, t3, grace)
                .delete
                .len(),
            1
        );
    }

    #[test]
    fn node_comes_from_the_attribute_before_affinity() {
        let mut p = pv("pv", DRIVER, "kv-a", "n1", "Bound");
        assert_eq!(pinned_to(&p), Some("n1"));
        p.spec
            .as_mut()
            .unwrap()
            .csi
            .as_mut()
            .unwrap()
            .volume_attributes = Some([(ATTR_NODE.to_owned(), "n9".to_owned())].into());
        assert_eq!(pinned_to(&p), Some("n9"));
    }
}
