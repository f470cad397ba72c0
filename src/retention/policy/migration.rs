//! Migrate on drain (opt-in per StatefulSet, `kennel.csi.dev/on-drain: migrate`): a claim whose
//! pod was evicted from a cordoned node moves, with its data, to another node.
//!
//! Each step is one write whose result the next pass reads back from the cluster, so a
//! controller killed between any two resumes where it was, and a step done twice is harmless:
//! 1. *retained*: the old PV gets reclaimPolicy Retain and the migration record.
//! 2. *snapshot requested*: a VolumeSnapshot of the claim (its pod is gone: the volume is quiet).
//! 3. *copy requested*: a staging claim restored from it, provisioned on the target node
//!    (selected-node), whose driver pulls the bytes over the peer channel and checks them.
//! 4. *copy kept*: the copy's PV gets Retain and a copy record.
//! 5. *staging released*: the staging claim is deleted; the copy's PV stays.
//! 6. *prebound*: the copy's PV is reserved for the claim's name (a claimRef without UID).
//! 7. *claim replaced*: the claim and its Pending pod are deleted (the pod read again uncached
//!    first); the claim the StatefulSet makes again binds to the reserved copy, so the pod
//!    can only start on the target node.
//! 8. When the pod is Ready there: *snapshot deleted*, *copy policy restored* (the old PV's
//!    reclaim policy), *old volume released* (Delete: its node's provisioner deletes it).
//!
//! Until step 7 the migration is undone (snapshot, staging claim and copy deleted, the old PV's
//! policy restored) if its pod is replaced or scheduled — it may have written after the
//! snapshot — or the set stops asking for it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
    TypedLocalObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use super::recovery::{find_volume, pinned_claims};
use super::{Action, Plan, Regarding, Scope, SnapshotState};
use crate::retention::migration_record::{
    copy_of, migration_of, staging_name, step, to_annotation, Migration, COPY_ANNOTATION,
    MIGRATION_ANNOTATION, MIGRATION_LABEL, ON_DRAIN_ANNOTATION, SELECTED_NODE_ANNOTATION,
};
use crate::retention::names::{claim_identity, pod_name};
use crate::retention::nodeloss::{unscheduled_since, verdict, NodeVerdict};
use crate::topology::pinned_node;

/// How often a running migration is looked at: its staging objects trigger no reconcile.
const POLL: Duration = Duration::from_secs(1);
/// How often a drained pod with nowhere to go is looked at again.
const NO_TARGET_POLL: Duration = Duration::from_secs(30);

/// One claim being moved: its old PV and the record on it.
struct Moving<'a> {
    pv: &'a PersistentVolume,
    pv_name: String,
    record: Migration,
    /// The UID of the claim the old PV is bound to.
    old_claim_uid: String,
    staging: String,
}

fn set_wants_migration(scope: &Scope<'_>) -> bool {
    scope
        .obs
        .set
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ON_DRAIN_ANNOTATION))
        .is_some_and(|v| v == "migrate")
}

/// Plans the next step of every migration of the set's claims, and starts new ones.
pub(super) fn plan_migrations(scope: &Scope<'_>, plan: &mut Plan) {
    let mut moving: BTreeMap<u32, Vec<Moving<'_>>> = BTreeMap::new();
    for &pv in scope.obs.volumes {
        let Some(record) = migration_of(pv) else {
            continue;
        };
        let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
        if claim_ref.and_then(|c| c.namespace.as_deref())
            != scope.obs.set.metadata.namespace.as_deref()
        {
            continue;
        }
        let Some((_, ordinal)) = claim_identity(scope.obs.set, &record.claim) else {
            continue;
        };
        let (Some(pv_name), Some(pv_uid), Some(old_claim_uid)) = (
            pv.metadata.name.clone(),
            pv.metadata.uid.as_deref(),
            claim_ref.and_then(|c| c.uid.clone()),
        ) else {
            continue;
        };
        plan.needs_snapshots = true;
        moving.entry(ordinal).or_default().push(Moving {
            pv,
            pv_name,
            staging: staging_name(pv_uid),
            record,
            old_claim_uid,
        });
    }
    for (&ordinal, moves) in &moving {
        advance(scope, ordinal, moves, plan);
    }
    if set_wants_migration(scope) {
        let busy: BTreeSet<u32> = moving.keys().copied().collect();
        for (&ordinal, &pod) in &scope.pods {
            if scope.range.contains(ordinal) && !busy.contains(&ordinal) {
                start(scope, ordinal, pod, plan);
            }
        }
    }
}

/// Starts moving the claims of `pod` (Pending, unschedulable) pinned to a cordoned node.
fn start(scope: &Scope<'_>, ordinal: u32, pod: &Pod, plan: &mut Plan) {
    if unscheduled_since(pod).is_none() {
        return;
    }
    let (Some(pod_name_), Some(pod_uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone())
    else {
        return;
    };
    let nodes = scope.obs.nodes;
    let drained: Vec<_> = pinned_claims(scope, ordinal)
        .into_iter()
        .filter(|p| verdict(&p.node, nodes) == NodeVerdict::Present && nodes.cordoned(&p.node))
        .filter(|p| migration_of(p.pv).is_none())
        .filter(|p| {
            let bound_uid =
                p.pv.spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|c| c.uid.as_deref());
            bound_uid.is_some() && bound_uid == p.claim.metadata.uid.as_deref()
        })
        .collect();
    for p in drained {
        let Some(target) = nodes
            .migration_targets(pod)
            .into_iter()
            .find(|n| *n != p.node)
            .map(str::to_owned)
        else {
            plan.event(
                false,
                "MigrationWaiting",
                "Wait",
                Regarding::Pod(pod_name_.clone()),
                format!(
                    "pod {pod_name_}: node {} is drained but no other node is Ready, schedulable, untainted, running Kennel and accepted by the pod's node selector and affinity; PersistentVolumeClaim {} stays until one is",
                    p.node, p.name
                ),
            );
            plan.requeue(NO_TARGET_POLL);
            continue;
        };
        let (Some(pv_name), Some(rv)) = (
            p.pv.metadata.name.clone(),
            p.pv.metadata.resource_version.clone(),
        ) else {
            continue;
        };
        let policy =
            p.pv.spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone())
                .unwrap_or_else(|| "Delete".to_owned());
        let record = Migration {
            claim: p.name.clone(),
            from: p.node.clone(),
            to: target.clone(),
            pod_uid: pod_uid.clone(),
            since: scope.opts.now.to_string(),
            reclaim_policy: policy,
        };
        let message = format!(
            "moving PersistentVolumeClaim {} of pod {pod_name_} from node {} (drained) to node {target}: its volume {pv_name} is kept, snapshotted and copied; the pod starts on {target} when the copy is complete",
            p.name, p.node
        );
        plan.event(
            false,
            "MigrationStarted",
            "Migrate",
            Regarding::Claim(p.name.clone()),
            message.clone(),
        );
        plan.event(
            false,
            "MigrationStarted",
            "Migrate",
            Regarding::Pod(pod_name_.clone()),
            message,
        );
        plan.actions.push(Action::PatchVolume {
            volume: pv_name,
            resource_version: rv,
            patch: json!({
                "metadata": {"annotations": {MIGRATION_ANNOTATION: to_annotation(&record)}},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            }),
        });
        plan.actions.push(Action::Reached(step::RETAINED));
        plan.requeue(POLL);
    }
}

/// Where one migration stands before its claim is replaced.
enum Ahead {
    /// A step was planned, or something is awaited.
    Busy,
    /// The copy is reserved for the claim: ready to replace it.
    Prebound,
}

fn advance(scope: &Scope<'_>, ordinal: u32, moves: &[Moving<'_>], plan: &mut Plan) {
    plan.requeue(POLL);
    let pod = scope.pods.get(&ordinal).copied();
    // A claim being deleted was replaced (or is going anyway): past the point of no return.
    let old_alive = |m: &Moving<'_>| {
        scope.claims.get(m.record.claim.as_str()).is_some_and(|c| {
            c.metadata.uid.as_deref() == Some(m.old_claim_uid.as_str())
                && c.metadata.deletion_timestamp.is_none()
        })
    };
    let mut prebound = Vec::new();
    let mut all_prebound = true;
    for m in moves {
        if !old_alive(m) {
            all_prebound = false;
            finish(scope, m, pod, plan);
            continue;
        }
        if let Some(why) = undo_reason(scope, m, pod) {
            all_prebound = false;
            undo(scope, m, &why, plan);
            continue;
        }
        match ahead(scope, m, plan) {
            Ahead::Busy => all_prebound = false,
            Ahead::Prebound => prebound.push(m),
        }
    }
    if !all_prebound || prebound.is_empty() {
        return;
    }
    let Some(pod) = pod else {
        return;
    };
    let pod_uid = prebound[0].record.pod_uid.clone();
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return;
    }
    let pod_name_ = pod_name(scope.set_name, ordinal);
    for m in &prebound {
        plan.event(
            false,
            "ClaimMoved",
            "DeleteClaim",
            Regarding::Claim(m.record.claim.clone()),
            format!(
                "replacing PersistentVolumeClaim {}: its data is copied to node {} and that copy is reserved for it; the StatefulSet makes the claim again and it binds there (volume {} on node {} is kept until the pod is Ready)",
                m.record.claim, m.record.to, m.pv_name, m.record.from
            ),
        );
    }
    plan.event(
        false,
        "PodMoved",
        "DeletePod",
        Regarding::Pod(pod_name_.clone()),
        format!(
            "deleting pending pod {pod_name_} so the StatefulSet recreates it with its claims on node {}",
            prebound[0].record.to
        ),
    );
    plan.actions.push(Action::ReplaceClaims {
        pod: pod_name_,
        pod_uid,
        claims: prebound
            .iter()
            .map(|m| (m.record.claim.clone(), m.old_claim_uid.clone()))
            .collect(),
    });
    plan.actions.push(Action::Reached(step::CLAIM_REPLACED));
}

/// Why a migration whose claim is not replaced yet must be undone, if it must.
fn undo_reason(scope: &Scope<'_>, m: &Moving<'_>, pod: Option<&Pod>) -> Option<String> {
    if !set_wants_migration(scope) {
        return Some(format!(
            "the StatefulSet no longer asks for it ({ON_DRAIN_ANNOTATION})"
        ));
    }
    let pod = pod?;
    if pod.metadata.uid.as_deref() != Some(m.record.pod_uid.as_str()) {
        return Some("its pod was replaced and may have used the old volume since".to_owned());
    }
    if unscheduled_since(pod).is_none() && pod.metadata.deletion_timestamp.is_none() {
        return Some("its pod was scheduled again".to_owned());
    }
    None
}

fn snapshot<'a>(scope: &Scope<'a>, name: &str) -> Option<&'a SnapshotState> {
    scope.obs.snapshots.iter().find(|s| s.name == name)
}

/// The PV the migration copied into: recorded as such, or bound to the staging claim.
fn copy_volume<'a>(
    scope: &Scope<'a>,
    m: &Moving<'_>,
    staging: Option<&PersistentVolumeClaim>,
) -> Option<&'a PersistentVolume> {
    scope
        .obs
        .volumes
        .iter()
        .copied()
        .find(|v| copy_of(v).is_some_and(|c| c.source == m.pv_name))
        .or_else(|| {
            let bound = staging?.spec.as_ref()?.volume_name.as_deref()?;
            find_volume(scope.obs.volumes, bound)
        })
}

fn claim_ref_name(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.claim_ref.as_ref()?.name.as_deref()
}

fn claim_ref_uid(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .claim_ref
        .as_ref()?
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
}

fn patch_volume(pv: &PersistentVolume, patch: serde_json::Value, plan: &mut Plan) -> bool {
    let (Some(volume), Some(resource_version)) = (
        pv.metadata.name.clone(),
        pv.metadata.resource_version.clone(),
    ) else {
        return false;
    };
    plan.actions.push(Action::PatchVolume {
        volume,
        resource_version,
        patch,
    });
    true
}

/// Steps 2-6, while the old claim is alive.
fn ahead(scope: &Scope<'_>, m: &Moving<'_>, plan: &mut Plan) -> Ahead {
    let staging = scope.claims.get(m.staging.as_str()).copied();
    let Some(copy) = copy_volume(scope, m, staging) else {
        if staging.is_some() {
            return Ahead::Busy; // the target node is restoring the snapshot
        }
        match snapshot(scope, &m.staging) {
            None => {
                plan.event(
                    false,
                    "MigrationSnapshot",
                    "Snapshot",
                    Regarding::Claim(m.record.claim.clone()),
                    format!(
                        "taking VolumeSnapshot {} of PersistentVolumeClaim {} on node {}",
                        m.staging, m.record.claim, m.record.from
                    ),
                );
                plan.actions.push(Action::CreateSnapshot {
                    name: m.staging.clone(),
                    claim: m.record.claim.clone(),
                    class: scope.opts.snapshot_class.clone(),
                    migration: m.pv.metadata.uid.clone().unwrap_or_default(),
                });
                plan.actions.push(Action::Reached(step::SNAPSHOT_REQUESTED));
            }
            Some(s) if s.ready => {
                if let Some(claim) = staging_claim(scope, m) {
                    plan.event(
                        false,
                        "MigrationCopying",
                        "Copy",
                        Regarding::Claim(m.record.claim.clone()),
                        format!(
                            "copying PersistentVolumeClaim {}'s snapshot to node {} (staging claim {})",
                            m.record.claim, m.record.to, m.staging
                        ),
                    );
                    plan.actions.push(Action::CreateClaim {
                        claim: Box::new(claim),
                    });
                    plan.actions.push(Action::Reached(step::COPY_REQUESTED));
                }
            }
            Some(_) => {} // the snapshot is being taken
        }
        return Ahead::Busy;
    };
    if copy_of(copy).is_none() {
        let Some(staging_uid) = staging.and_then(|s| s.metadata.uid.clone()) else {
            return Ahead::Busy;
        };
        let record = crate::retention::migration_record::Copy {
            source: m.pv_name.clone(),
            staging_uid,
        };
        if patch_volume(
            copy,
            json!({
                "metadata": {"annotations": {COPY_ANNOTATION: to_annotation(&record)}},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            }),
            plan,
        ) {
            plan.actions.push(Action::Reached(step::COPY_KEPT));
        }
        return Ahead::Busy;
    }
    if let Some(staging) = staging {
        if delete_staging(m, staging, plan) {
            plan.actions.push(Action::Reached(step::STAGING_RELEASED));
        }
        return Ahead::Busy;
    }
    match (claim_ref_name(copy), claim_ref_uid(copy)) {
        (Some(name), _) if name == m.staging => {
            if patch_volume(
                copy,
                json!({"spec": {"claimRef": {
                    "name": m.record.claim,
                    "uid": null,
                    "resourceVersion": null,
                }}}),
                plan,
            ) {
                plan.actions.push(Action::Reached(step::PREBOUND));
            }
            Ahead::Busy
        }
        (Some(name), None) if name == m.record.claim => Ahead::Prebound,
        _ => Ahead::Busy,
    }
}

/// Deletes the staging claim unless it is already going; whether it planned the delete.
fn delete_staging(m: &Moving<'_>, staging: &PersistentVolumeClaim, plan: &mut Plan) -> bool {
    if staging.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let (Some(uid), Some(resource_version)) = (
        staging.metadata.uid.clone(),
        staging.metadata.resource_version.clone(),
    ) else {
        return false;
    };
    plan.actions.push(Action::DeleteClaim {
        claim: m.staging.clone(),
        uid,
        resource_version,
    });
    true
}

/// The staging claim: the old claim's class, modes and the old volume's size, restored from
/// the migration's snapshot on the target node.
fn staging_claim(scope: &Scope<'_>, m: &Moving<'_>) -> Option<PersistentVolumeClaim> {
    let old = scope.claims.get(m.record.claim.as_str())?;
    let spec = old.spec.as_ref()?;
    let size =
        m.pv.spec
            .as_ref()?
            .capacity
            .as_ref()?
            .get("storage")?
            .clone();
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(m.staging.clone()),
            namespace: old.metadata.namespace.clone(),
            labels: Some(
                [(
                    MIGRATION_LABEL.to_owned(),
                    m.pv.metadata.uid.clone().unwrap_or_default(),
                )]
                .into(),
            ),
            annotations: Some([(SELECTED_NODE_ANNOTATION.to_owned(), m.record.to.clone())].into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: spec.access_modes.clone(),
            storage_class_name: spec.storage_class_name.clone(),
            volume_mode: spec.volume_mode.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_owned(), size)].into()),
                ..Default::default()
            }),
            data_source: Some(TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name: m.staging.clone(),
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// Undoes a migration whose claim was not replaced, one step per pass; the record on the old
/// PV goes last, so an interrupted undo is finished by the next pass.
fn undo(scope: &Scope<'_>, m: &Moving<'_>, why: &str, plan: &mut Plan) {
    // Watch caches lag each other: a new pod may show before the deletion of the claim it
    // was replaced with. Undoing is safe only while the old claim really is in place.
    plan.actions.push(Action::ConfirmClaim {
        claim: m.record.claim.clone(),
        uid: m.old_claim_uid.clone(),
        in_place: true,
    });
    let staging = scope.claims.get(m.staging.as_str()).copied();
    let copy = copy_volume(scope, m, staging);
    // The staging claim first: a snapshot still restoring into it cannot be deleted (its
    // deletion would wait for the controller's next resync).
    if let Some(staging) = staging {
        // The copy goes with the staging claim once its policy is Delete again.
        let kept = copy.is_some_and(|c| {
            c.spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                == Some("Retain")
        });
        match copy.filter(|_| kept) {
            Some(copy) => {
                patch_volume(
                    copy,
                    json!({
                        "metadata": {"annotations": {COPY_ANNOTATION: null}},
                        "spec": {"persistentVolumeReclaimPolicy": "Delete"},
                    }),
                    plan,
                );
            }
            None => {
                delete_staging(m, staging, plan);
            }
        }
        return;
    }
    if let Some((copy, record)) = copy.and_then(|c| Some((c, copy_of(c)?))) {
        // Bound back to the deleted staging claim, the copy is Released and deleted.
        patch_volume(
            copy,
            json!({
                "metadata": {"annotations": {COPY_ANNOTATION: null}},
                "spec": {
                    "persistentVolumeReclaimPolicy": "Delete",
                    "claimRef": {"name": m.staging, "uid": record.staging_uid, "resourceVersion": null},
                },
            }),
            plan,
        );
        return;
    }
    if let Some(s) = snapshot(scope, &m.staging) {
        if !s.deleting {
            plan.actions.push(Action::DeleteSnapshot {
                name: m.staging.clone(),
            });
        }
        return;
    }
    plan.event(
        true,
        "MigrationUndone",
        "Migrate",
        Regarding::Claim(m.record.claim.clone()),
        format!(
            "PersistentVolumeClaim {} stays on node {}: {why}; its snapshot and copy are deleted and its volume's reclaim policy is {} again",
            m.record.claim, m.record.from, m.record.reclaim_policy
        ),
    );
    patch_volume(
        m.pv,
        json!({
            "metadata": {"annotations": {MIGRATION_ANNOTATION: null}},
            "spec": {"persistentVolumeReclaimPolicy": m.record.reclaim_policy},
        }),
        plan,
    );
}

/// After the claim was replaced: once the new claim is bound to the copy and the pod is Ready
/// on the target, the snapshot goes, then the copy gets the old reclaim policy and the old
/// volume is released for deletion.
fn finish(scope: &Scope<'_>, m: &Moving<'_>, pod: Option<&Pod>, plan: &mut Plan) {
    let Some(claim) = scope.claims.get(m.record.claim.as_str()) else {
        // The StatefulSet makes it again with the pod; a pod left behind by an interrupted
        // replacement is deleted again.
        if let Some(pod) = pod.filter(|p| {
            p.metadata.uid.as_deref() == Some(m.record.pod_uid.as_str())
                && p.metadata.deletion_timestamp.is_none()
        }) {
            if let Some(name) = pod.metadata.name.clone() {
                // Only on the API server's word that the claim is gone, never a cache's.
                plan.actions.push(Action::ConfirmClaim {
                    claim: m.record.claim.clone(),
                    uid: m.old_claim_uid.clone(),
                    in_place: false,
                });
                plan.actions.push(Action::DeletePod {
                    pod: name,
                    uid: m.record.pod_uid.clone(),
                });
            }
        }
        return;
    };
    let Some(copy) = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .and_then(|v| find_volume(scope.obs.volumes, v))
    else {
        return;
    };
    if pinned_node(copy).as_deref() != Some(m.record.to.as_str()) {
        return;
    }
    let ready_there = pod.is_some_and(|p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(m.record.to.as_str())
            && p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    if !ready_there {
        return;
    }
    if let Some(s) = snapshot(scope, &m.staging) {
        if !s.deleting {
            plan.actions.push(Action::DeleteSnapshot {
                name: m.staging.clone(),
            });
            plan.actions.push(Action::Reached(step::SNAPSHOT_DELETED));
        }
        return; // the old volume goes after its snapshot
    }
    if copy_of(copy).is_some() {
        if patch_volume(
            copy,
            json!({
                "metadata": {"annotations": {COPY_ANNOTATION: null}},
                "spec": {"persistentVolumeReclaimPolicy": m.record.reclaim_policy},
            }),
            plan,
        ) {
            plan.actions
                .push(Action::Reached(step::COPY_POLICY_RESTORED));
        }
        return;
    }
    let policy =
        m.pv.spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
    if policy == Some("Delete") {
        return; // its provisioner deletes it
    }
    let pod_name_ = pod
        .and_then(|p| p.metadata.name.clone())
        .unwrap_or_default();
    let took = scope
        .opts
        .now
        .duration_since(m.record.since.parse().unwrap_or(scope.opts.now));
    plan.event(
        false,
        "MigrationComplete",
        "Migrate",
        Regarding::Claim(m.record.claim.clone()),
        format!(
            "PersistentVolumeClaim {} moved from node {} to node {} in {:.0}s; its old volume {} is deleted",
            m.record.claim,
            m.record.from,
            m.record.to,
            took.as_secs_f64(),
            m.pv_name
        ),
    );
    plan.event(
        false,
        "MigrationComplete",
        "Migrate",
        Regarding::Pod(pod_name_.clone()),
        format!(
            "pod {pod_name_} runs on node {} with PersistentVolumeClaim {} moved from node {}",
            m.record.to, m.record.claim, m.record.from
        ),
    );
    if patch_volume(
        m.pv,
        json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}}),
        plan,
    ) {
        plan.actions
            .push(Action::Reached(step::OLD_VOLUME_RELEASED));
    }
}

#[cfg(test)]
mod tests;
