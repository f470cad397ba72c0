//! Node-loss recovery: claims of a pod stranded by a lost node are recreated, and volumes
//! left on a node that no longer exists are cleaned. What counts as evidence is `nodeloss`'s.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;

use super::{Action, Plan, Regarding, Scope, ON_NODE_LOSS_ANNOTATION, PROVISIONER_FINALIZER};
use crate::retention::names::{claim_identity, claim_name, templates};
use crate::retention::nodeloss::{
    has_loss_record, identity_change, loss_record, loss_recorded, pv_driver, unscheduled_since,
    verdict, NodeVerdict, NODE_LOST_ANNOTATION,
};
use crate::topology::pinned_node;

/// One claim of a pod and the node its Kennel volume is pinned to.
pub(super) struct PinnedClaim<'a> {
    pub claim: &'a PersistentVolumeClaim,
    pub name: String,
    pub pv: &'a PersistentVolume,
    pub node: String,
}

/// The pod's live claims whose Kennel volume is pinned to one node.
pub(super) fn pinned_claims<'a>(scope: &Scope<'a>, ordinal: u32) -> Vec<PinnedClaim<'a>> {
    let mut found = Vec::new();
    for template in templates(scope.obs.set) {
        let name = claim_name(&template, scope.set_name, ordinal);
        let Some(&claim) = scope.claims.get(name.as_str()) else {
            continue;
        };
        if claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(pv) = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .and_then(|v| find_volume(scope.obs.volumes, v))
        else {
            continue;
        };
        if pv_driver(pv) != Some(scope.opts.driver_name.as_str()) {
            continue;
        }
        let Some(node) = pinned_node(pv) else {
            continue;
        };
        found.push(PinnedClaim {
            claim,
            name,
            pv,
            node,
        });
    }
    found
}

/// Removes a node-loss record from a claim whose node turned out not to be lost, so that
/// evidence seen later starts a new grace period.
fn clear_record(pinned: &PinnedClaim<'_>, why: &str, plan: &mut Plan) {
    let Some(rv) = pinned.claim.metadata.resource_version.clone() else {
        return;
    };
    let name = &pinned.name;
    plan.event(
        false,
        "NodeLossCleared",
        "Annotate",
        Regarding::Claim(name.clone()),
        format!(
            "PersistentVolumeClaim {name}: node {} {why}; its node-loss record is removed",
            pinned.node
        ),
    );
    plan.actions.push(Action::SetClaimAnnotation {
        claim: name.clone(),
        resource_version: rv,
        key: NODE_LOST_ANNOTATION,
        value: None,
    });
}

/// Recreates the claims of a pod stuck because its node-local volume's node is gone (see
/// `nodeloss` for what counts as evidence). The grace period starts when the evidence is
/// first seen, recorded on the claim; the warning is published when that happens, not on
/// every pass. Every claim it deletes is named in an event, and so in the log, before the
/// delete.
pub(super) fn recover_from_node_loss(scope: &Scope<'_>, ordinal: u32, pod: &Pod, plan: &mut Plan) {
    let (Some(pod_name_), Some(pod_uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone())
    else {
        return;
    };
    let pinned = pinned_claims(scope, ordinal);
    if unscheduled_since(pod).is_none() {
        // The pod found a node: whatever was recorded, its volume is not lost.
        for p in pinned.iter().filter(|p| has_loss_record(p.claim)) {
            clear_record(p, "serves its pod again", plan);
        }
        return;
    }
    let (now, grace) = (scope.opts.now, scope.opts.node_loss_grace);
    // (claim, verdict, when the evidence was first seen, if recorded)
    let mut lost = Vec::new();
    for p in &pinned {
        match verdict(&p.node, scope.obs.nodes) {
            NodeVerdict::Present => {
                if has_loss_record(p.claim) {
                    clear_record(p, "is back", plan);
                }
                if let Some((recorded, current)) = identity_change(p.pv, &p.node, scope.obs.nodes) {
                    let (name, node) = (&p.name, &p.node);
                    plan.event(
                        true,
                        "NodeIdentityChanged",
                        "Wait",
                        Regarding::Pod(pod_name_.clone()),
                        format!(
                            "pod {pod_name_} cannot be scheduled; PersistentVolumeClaim {name}'s volume was made on machine {recorded}, node {node} now reports machine {current}. Kennel does not act on this: node {node} is not lost. If its disk is really gone, delete the claim and the pod by hand"
                        ),
                    );
                }
            }
            NodeVerdict::Unconfirmed => plan.unconfirmed(p.node.clone()),
            v @ (NodeVerdict::Deleted | NodeVerdict::OutOfService) => {
                lost.push((p, v, loss_recorded(p.claim, &p.node)))
            }
        }
    }
    if lost.is_empty() {
        return;
    }
    // New evidence is written down before anything else: the grace period runs from here.
    let mut records = Vec::new();
    let mut since = Timestamp::MIN;
    for (p, _, recorded) in &lost {
        let seen = match recorded {
            Some(at) => *at,
            None => {
                let Some(rv) = p.claim.metadata.resource_version.clone() else {
                    return;
                };
                records.push(Action::SetClaimAnnotation {
                    claim: p.name.clone(),
                    resource_version: rv,
                    key: NODE_LOST_ANNOTATION,
                    value: Some(loss_record(&p.node, now)),
                });
                now
            }
        };
        since = since.max(seen);
    }
    let what: Vec<String> = lost
        .iter()
        .map(|(p, v, _)| format!("{} on node {} ({})", p.name, p.node, v.evidence()))
        .collect();
    let recreate = scope
        .obs
        .set
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ON_NODE_LOSS_ANNOTATION))
        .is_some_and(|v| v == "recreate");
    let newly_seen = !records.is_empty();
    let waited = Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO);
    if !recreate || newly_seen || waited < grace {
        // The record goes first: a pass that planned from a cache not yet showing it fails
        // its write (resourceVersion) before it would announce the same loss again.
        plan.actions.extend(records);
        if recreate {
            // At least a second: a claim is never deleted in the pass that recorded it.
            plan.requeue(grace.saturating_sub(waited).max(Duration::from_secs(1)));
        }
        if newly_seen {
            let next = if recreate {
                let deadline = since.checked_add(grace).map_or_else(
                    |_| "the end of the grace period".to_owned(),
                    |t| t.to_string(),
                );
                format!("recreating the claim at {deadline} unless the node returns")
            } else {
                format!("waiting (annotate the StatefulSet {ON_NODE_LOSS_ANNOTATION}=recreate to recreate the claim elsewhere)")
            };
            plan.event(
                true,
                "NodeLost",
                "Wait",
                Regarding::Pod(pod_name_.clone()),
                format!(
                    "pod {pod_name_} cannot be scheduled: its volume is lost with its node: {}; {next}",
                    what.join(", ")
                ),
            );
        }
        return;
    }
    for (p, verdict, _) in &lost {
        let (Some(uid), Some(rv)) = (
            p.claim.metadata.uid.clone(),
            p.claim.metadata.resource_version.clone(),
        ) else {
            continue;
        };
        let (name, node) = (&p.name, &p.node);
        plan.event(
            true,
            "ClaimRecreatedAfterNodeLoss",
            "DeleteClaim",
            Regarding::Claim(name.clone()),
            format!(
                "deleting PersistentVolumeClaim {name} of pod {pod_name_}: its volume was on node {node}, and {} (first seen {since}); the StatefulSet makes a new claim on a live node",
                verdict.evidence()
            ),
        );
        plan.actions.push(Action::DeleteClaim {
            claim: name.clone(),
            uid,
            resource_version: rv,
        });
    }
    plan.event(
        true,
        "PodRecreatedAfterNodeLoss",
        "DeletePod",
        Regarding::Pod(pod_name_.clone()),
        format!(
            "deleting pending pod {pod_name_} so the StatefulSet recreates it with its new claim"
        ),
    );
    plan.actions.push(Action::DeletePod {
        pod: pod_name_,
        uid: pod_uid,
    });
}

pub(super) fn find_volume<'a>(
    volumes: &[&'a PersistentVolume],
    name: &str,
) -> Option<&'a PersistentVolume> {
    volumes
        .iter()
        .find(|pv| pv.metadata.name.as_deref() == Some(name))
        .copied()
}

/// A Released Kennel PV of one of the set's claims whose Node object is confirmed deleted can
/// never be cleaned by its provisioner: drop the provisioner's finalizer and delete it
/// (reclaimPolicy Delete only; Retain keeps it for the administrator). A node that still exists,
/// in any state, runs (or will run again) a provisioner that deletes the volume itself.
pub(super) fn clean_stale_volume(scope: &Scope<'_>, pv: &PersistentVolume, plan: &mut Plan) {
    if pv_driver(pv) != Some(scope.opts.driver_name.as_str()) {
        return;
    }
    let Some(spec) = pv.spec.as_ref() else {
        return;
    };
    let belongs = spec.claim_ref.as_ref().is_some_and(|c| {
        c.namespace == scope.obs.set.metadata.namespace
            && c.name
                .as_deref()
                .is_some_and(|n| claim_identity(scope.obs.set, n).is_some())
    });
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    if !belongs || !released || spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
        return;
    }
    let (Some(name), Some(uid), Some(rv)) = (
        pv.metadata.name.clone(),
        pv.metadata.uid.clone(),
        pv.metadata.resource_version.clone(),
    ) else {
        return;
    };
    let Some(node) = pinned_node(pv) else {
        return;
    };
    match verdict(&node, scope.obs.nodes) {
        NodeVerdict::Deleted => {}
        NodeVerdict::Unconfirmed => {
            plan.unconfirmed(node);
            return;
        }
        _ => return,
    }
    let finalizers = pv.metadata.finalizers.clone().unwrap_or_default();
    let has_finalizer = finalizers.iter().any(|f| f == PROVISIONER_FINALIZER);
    if !has_finalizer && pv.metadata.deletion_timestamp.is_some() {
        return; // already on its way out
    }
    plan.event(
        false,
        "StaleVolumeCleaned",
        "DeleteVolume",
        Regarding::Volume(name.clone()),
        format!(
            "removing PersistentVolume {name}: it was released and its node {node} is deleted, so no provisioner can delete it"
        ),
    );
    if has_finalizer {
        plan.actions.push(Action::SetVolumeFinalizers {
            volume: name.clone(),
            resource_version: rv,
            finalizers: finalizers
                .into_iter()
                .filter(|f| f != PROVISIONER_FINALIZER)
                .collect(),
        });
    }
    if pv.metadata.deletion_timestamp.is_none() {
        plan.actions
            .push(Action::DeleteVolume { volume: name, uid });
    }
}
