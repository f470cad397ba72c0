//! `kennel ctl where`: where each claim's data is, from the Kubernetes API — the node its PV is
//! pinned to, a migration under way (recorded on the old PV by the retention controller) and
//! any pull of a snapshot's bytes from another node (published by the pulling node's driver in
//! its peer Lease), with its progress. Reads only; works from any machine with a kubeconfig.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use serde::Serialize;

use super::render::{size, table};
use crate::peer::transfers::{self, TransferStatus, TRANSFERS_ANNOTATION};
use crate::retention::migration_record::{migration_of, MIGRATION_LABEL};
use crate::topology::pinned_node;

/// One claim: where its data is and what is moving it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub namespace: String,
    pub claim: String,
    /// Empty while the claim has no volume.
    pub volume: String,
    /// The node holding the data; empty while nothing holds it yet.
    pub node: String,
    pub size: Option<u64>,
    /// Moving to another node (migrate on drain).
    pub moving_to: Option<String>,
    /// Bytes being pulled into this claim (or into its migration's copy) from another node.
    pub transfer: Option<TransferStatus>,
}

impl Placement {
    pub fn state(&self) -> String {
        let progress = self.transfer.as_ref().map(|t| {
            let percent = (t.done * 100).checked_div(t.total).unwrap_or(0);
            format!(
                "pulling from {}: {percent}% ({} of {})",
                t.from,
                size(t.done),
                size(t.total)
            )
        });
        match (&self.moving_to, progress) {
            (Some(to), Some(p)) => format!("moving to {to}, {p}"),
            (Some(to), None) => format!("moving to {to}"),
            (None, Some(p)) => format!("restoring, {p}"),
            (None, None) => "-".to_owned(),
        }
    }
}

fn bytes(pv: &PersistentVolume) -> Option<u64> {
    let q = pv.spec.as_ref()?.capacity.as_ref()?.get("storage")?;
    crate::model::volume_size::parse_size(&q.0).ok()
}

/// Every claim of `driver`'s volumes (in `namespace`, if given), with its placement.
/// A migration's staging claim is not listed on its own: its pull shows on the claim it moves.
pub fn placements(
    driver: &str,
    namespace: Option<&str>,
    volumes: &[PersistentVolume],
    claims: &[PersistentVolumeClaim],
    leases: &[Lease],
) -> Vec<Placement> {
    let pulls: BTreeMap<String, TransferStatus> = leases
        .iter()
        .filter_map(|l| l.metadata.annotations.as_ref()?.get(TRANSFERS_ANNOTATION))
        .flat_map(|a| transfers::parse(a))
        .map(|t| (t.claim.clone(), t))
        .collect();
    let kennel: Vec<&PersistentVolume> = volumes
        .iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .is_some_and(|c| c.driver == driver)
        })
        .collect();
    let mut rows = BTreeMap::new();
    for claim in claims {
        let (Some(ns), Some(name)) = (
            claim.metadata.namespace.clone(),
            claim.metadata.name.clone(),
        ) else {
            continue;
        };
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        let staging = claim
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(MIGRATION_LABEL));
        if staging {
            continue;
        }
        let volume = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        let pv = volume.as_deref().and_then(|v| {
            kennel
                .iter()
                .find(|pv| pv.metadata.name.as_deref() == Some(v))
        });
        let pull = pulls.get(&format!("{ns}/{name}")).cloned();
        if pv.is_none() && pull.is_none() {
            continue; // not Kennel's, or waiting for a node
        }
        rows.insert(
            (ns.clone(), name.clone()),
            Placement {
                namespace: ns,
                claim: name,
                volume: volume.unwrap_or_default(),
                node: pv.and_then(|pv| pinned_node(pv)).unwrap_or_default(),
                size: pv.and_then(|pv| bytes(pv)),
                moving_to: None,
                transfer: pull,
            },
        );
    }
    // Migrations: recorded on the old PV, copied through a staging claim of the same namespace.
    for pv in &kennel {
        let Some(record) = migration_of(pv) else {
            continue;
        };
        let Some(ns) = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|c| c.namespace.clone())
        else {
            continue;
        };
        let Some(row) = rows.get_mut(&(ns.clone(), record.claim.clone())) else {
            continue;
        };
        // Until the claim is replaced it is bound to the old PV; after, to the copy.
        if row.volume != pv.metadata.name.clone().unwrap_or_default() {
            continue;
        }
        row.moving_to = Some(record.to.clone());
        let staging = pv
            .metadata
            .uid
            .as_deref()
            .map(crate::retention::migration_record::staging_name)
            .unwrap_or_default();
        if let Some(pull) = pulls.get(&format!("{ns}/{staging}")) {
            row.transfer = Some(pull.clone());
        }
    }
    rows.into_values().collect()
}

/// The placements as a table.
pub fn render(rows: &[Placement]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|p| {
            vec![
                p.namespace.clone(),
                p.claim.clone(),
                if p.node.is_empty() {
                    "-".into()
                } else {
                    p.node.clone()
                },
                p.size.map_or_else(|| "-".into(), size),
                if p.volume.is_empty() {
                    "-".into()
                } else {
                    p.volume.clone()
                },
                p.state(),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "CLAIM", "NODE", "SIZE", "VOLUME", "STATE"],
        &cells,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::migration_record::{to_annotation, Migration, MIGRATION_ANNOTATION};
    use serde_json::json;

    fn pv(name: &str, uid: &str, node: &str, claim: &str) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": uid},
            "spec": {
                "capacity": {"storage": "64Mi"},
                "claimRef": {"namespace": "ns", "name": claim},
                "csi": {"driver": "kennel.csi.dev", "volumeHandle": name},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{
                    "key": crate::topology::TOPOLOGY_KEY, "operator": "In", "values": [node],
                }]}]}},
            },
        }))
        .unwrap()
    }

    fn claim(name: &str, volume: Option<&str>, labels: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {"volumeName": volume},
        }))
        .unwrap()
    }

    fn lease(transfers: &[TransferStatus]) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "kennel-peer-node-b", "annotations": {
                TRANSFERS_ANNOTATION: serde_json::to_string(transfers).unwrap(),
            }},
        }))
        .unwrap()
    }

    fn pull(claim: &str, done: u64) -> TransferStatus {
        TransferStatus {
            claim: claim.into(),
            snapshot: "ks-1@node-a".into(),
            from: "node-a".into(),
            done,
            total: 64 << 20,
            since: "2026-12-03T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_claim_shows_its_node_and_a_restore_its_pull() {
        let volumes = [pv("pv-1", "u1", "node-a", "data")];
        let claims = [
            claim("data", Some("pv-1"), json!({})),
            claim("copy", None, json!({})),
            claim("elsewhere", None, json!({})),
        ];
        let rows = placements(
            "kennel.csi.dev",
            None,
            &volumes,
            &claims,
            &[lease(&[pull("ns/copy", 16 << 20)])],
        );
        assert_eq!(rows.len(), 2, "{rows:?}");
        let copy = &rows[0];
        assert_eq!((copy.claim.as_str(), copy.node.as_str()), ("copy", ""));
        assert_eq!(
            copy.state(),
            "restoring, pulling from node-a: 25% (16 MiB of 64 MiB)"
        );
        let data = &rows[1];
        assert_eq!((data.node.as_str(), data.size), ("node-a", Some(64 << 20)));
        assert_eq!(data.state(), "-");
        let text = render(&rows);
        assert!(text.starts_with("NAMESPACE"), "{text}");
        assert!(text.contains("pulling from node-a: 25%"), "{text}");
    }

    #[test]
    fn a_migrating_claim_shows_its_target_and_its_staging_pull() {
        let mut old = pv("pv-old", "uid-old", "node-a", "data");
        let record = Migration {
            claim: "data".into(),
            from: "node-a".into(),
            to: "node-b".into(),
            pod_uid: "p".into(),
            since: "2026-12-03T00:00:00Z".into(),
            reclaim_policy: "Delete".into(),
        };
        old.metadata.annotations =
            Some([(MIGRATION_ANNOTATION.to_owned(), to_annotation(&record))].into());
        let staging = crate::retention::migration_record::staging_name("uid-old");
        let claims = [
            claim("data", Some("pv-old"), json!({})),
            claim(&staging, None, json!({MIGRATION_LABEL: "uid-old"})),
        ];
        let leases = [lease(&[pull(&format!("ns/{staging}"), 32 << 20)])];
        let rows = placements(
            "kennel.csi.dev",
            Some("ns"),
            &[old.clone()],
            &claims,
            &leases,
        );
        assert_eq!(rows.len(), 1, "the staging claim is not listed: {rows:?}");
        assert_eq!(
            rows[0].state(),
            "moving to node-b, pulling from node-a: 50% (32 MiB of 64 MiB)"
        );
        // Replaced: the claim is bound to the copy; the old PV's record no longer applies.
        let copy = pv("pv-new", "uid-new", "node-b", "data");
        let claims = [claim("data", Some("pv-new"), json!({}))];
        let rows = placements("kennel.csi.dev", None, &[old, copy], &claims, &[]);
        assert_eq!(
            (rows[0].node.as_str(), rows[0].state()),
            ("node-b", "-".into())
        );
        assert!(placements("kennel.csi.dev", Some("other"), &[], &claims, &[]).is_empty());
    }
}
