//! The reattach guard: a recreated ordinal's pod waits while its old claim is still being
//! deleted, so it never binds the dying volume.

use k8s_openapi::api::core::v1::Pod;

use super::{Action, Plan, Regarding, Scope};
use crate::retention::names::{claim_name, templates};
use crate::retention::owners::Owner;

/// Keeps an in-range pod off a Terminating claim. Returns true when the pod is being held.
pub(super) fn hold_pod(scope: &Scope<'_>, ordinal: u32, pod: &Pod, plan: &mut Plan) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let (Some(pod_name_), Some(pod_uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone())
    else {
        return false;
    };
    let pod_owner = Owner::pod(pod_name_.clone(), Some(pod_uid.clone()));
    let pending = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
        == "Pending";
    for template in templates(scope.obs.set) {
        let name = claim_name(&template, scope.set_name, ordinal);
        let Some(claim) = scope.claims.get(name.as_str()) else {
            continue;
        };
        if claim.metadata.deletion_timestamp.is_none() {
            continue;
        }
        // A reference to an earlier pod proves the collector is deleting the claim because of
        // the previous incarnation: the pod must not keep running on it.
        let collected_for_earlier_pod = claim
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| pod_owner.is_stale(r));
        if pending || collected_for_earlier_pod {
            plan.event(
                true,
                "PodHeldForTerminatingClaim",
                "DeletePod",
                Regarding::Pod(pod_name_.clone()),
                format!(
                    "deleting pod {pod_name_}: its PersistentVolumeClaim {name} is terminating; the StatefulSet recreates the pod once the claim is gone and made again"
                ),
            );
            plan.actions.push(Action::DeletePod {
                pod: pod_name_.clone(),
                uid: pod_uid,
            });
        } else {
            plan.event(
                true,
                "PodOnTerminatingClaim",
                "Wait",
                Regarding::Pod(pod_name_.clone()),
                format!("pod {pod_name_} is running on PersistentVolumeClaim {name}, which is terminating"),
            );
        }
        return true;
    }
    false
}
