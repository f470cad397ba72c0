//! Node-loss recovery: claims of a pod stranded by a lost node are recreated, and volumes
//! left on a node that no longer exists are cleaned. What counts as evidence is `nodeloss`'s.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, Pod};

use super::{Action, Plan, Regarding, Scope, ON_NODE_LOSS_ANNOTATION, PROVISIONER_FINALIZER};
use crate::retention::names::{claim_identity, claim_name, templates};
use crate::retention::nodeloss::{
    identity_change, pinned_node, pv_driver, unscheduled_since, verdict, NodeVerdict,
};

/// Recreates the claims of a pod stuck because its node-local volume's node is gone (see
/// `nodeloss` for what counts as evidence). Every claim it deletes is named in an event, and
/// so in the log, before the delete.
pub(super) fn recover_from_node_loss(scope: &Scope<'_>, ordinal: u32, pod: &Pod, plan: &mut Plan) {
    let Some(since) = unscheduled_since(pod) else {
        return;
    };
    let (Some(pod_name_), Some(pod_uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone())
    else {
        return;
    };
    let (now, grace) = (scope.opts.now, scope.opts.node_loss_grace);
    let mut lost = Vec::new();
    for template in templates(scope.obs.set) {
        let name = claim_name(&template, scope.set_name, ordinal);
        let Some(claim) = scope.claims.get(name.as_str()) else {
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
        match verdict(&node, scope.obs.nodes, now, grace) {
            NodeVerdict::Present => {
                if let Some((recorded, current)) = identity_change(pv, &node, scope.obs.nodes) {
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
            NodeVerdict::NotReady { remaining } => plan.requeue(remaining),
            NodeVerdict::Unconfirmed => plan.unconfirmed(node),
            NodeVerdict::DriverUnconfirmed => plan.unconfirmed_driver(node),
            v @ (NodeVerdict::Deleted | NodeVerdict::Abandoned { .. }) => {
                lost.push((*claim, node, v))
            }
        }
    }
    if lost.is_empty() {
        return;
    }
    let what: Vec<String> = lost
        .iter()
        .map(|(c, node, v)| {
            let claim = c.metadata.name.as_deref().unwrap_or_default();
            format!("{claim} on node {node} ({})", v.evidence())
        })
        .collect();
    let recreate = scope
        .obs
        .set
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ON_NODE_LOSS_ANNOTATION))
        .is_some_and(|v| v == "recreate");
    if !recreate {
        plan.event(
            true,
            "NodeLost",
            "Wait",
            Regarding::Pod(pod_name_.clone()),
            format!(
                "pod {pod_name_} cannot be scheduled: its volume is lost with its node: {}; waiting (annotate the StatefulSet {ON_NODE_LOSS_ANNOTATION}=recreate to recreate the claim elsewhere)",
                what.join(", ")
            ),
        );
        return;
    }
    let waited = Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO);
    if waited < grace {
        plan.requeue(grace - waited);
        // An absolute deadline keeps the message the same on every pass, so a merged event
        // series never shows a stale countdown.
        let deadline = since.checked_add(grace).map_or_else(
            |_| "the end of the grace period".to_owned(),
            |t| t.to_string(),
        );
        plan.event(
            true,
            "NodeLost",
            "Wait",
            Regarding::Pod(pod_name_.clone()),
            format!(
                "pod {pod_name_} cannot be scheduled: its volume is lost with its node: {}; recreating the claim at {deadline} unless the node returns",
                what.join(", ")
            ),
        );
        return;
    }
    for (claim, node, verdict) in &lost {
        let (Some(name), Some(uid), Some(rv)) = (
            claim.metadata.name.clone(),
            claim.metadata.uid.clone(),
            claim.metadata.resource_version.clone(),
        ) else {
            continue;
        };
        plan.event(
            true,
            "ClaimRecreatedAfterNodeLoss",
            "DeleteClaim",
            Regarding::Claim(name.clone()),
            format!(
                "deleting PersistentVolumeClaim {name} of pod {pod_name_}: its volume was on node {node}, and {}; the StatefulSet makes a new claim on a live node",
                verdict.evidence()
            ),
        );
        plan.actions.push(Action::DeleteClaim {
            claim: name,
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
    match verdict(
        &node,
        scope.obs.nodes,
        scope.opts.now,
        scope.opts.node_loss_grace,
    ) {
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
