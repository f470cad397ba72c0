//! The opt-in sweep of out-of-range claims whose pod vanished before it was referenced.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::{Action, Plan, PolicyType, Regarding, Scope};
use crate::retention::owners::{is_controller, Owner};

/// Opt-in: an out-of-range claim whose pod vanished before a pod reference was written is kept by
/// upstream forever; with whenScaled=Delete the sweep deletes it.
pub(super) fn sweep_claim(
    scope: &Scope<'_>,
    claim: &PersistentVolumeClaim,
    refs: &[OwnerReference],
    pod_owner: &Owner,
    plan: &mut Plan,
) {
    if !scope.opts.sweep_orphaned_claims || scope.policy.when_scaled != PolicyType::Delete {
        return;
    }
    // A pod reference (any UID) means the collector will handle it; a foreign controller means
    // someone else manages it.
    let managed_elsewhere = refs
        .iter()
        .any(|r| pod_owner.named_by(r) || (is_controller(r) && !scope.set_owner.named_by(r)));
    let (Some(name), Some(uid), Some(rv)) = (
        claim.metadata.name.clone(),
        claim.metadata.uid.clone(),
        claim.metadata.resource_version.clone(),
    ) else {
        return;
    };
    if managed_elsewhere {
        return;
    }
    plan.event(
        false,
        "OrphanedClaimDeleted",
        "DeleteClaim",
        Regarding::Claim(name.clone()),
        format!(
            "deleting PersistentVolumeClaim {name}: its ordinal is out of range, its pod {} is gone and whenScaled=Delete (--sweep-orphaned-claims)",
            pod_owner.name
        ),
    );
    plan.actions.push(Action::DeleteClaim {
        claim: name,
        uid,
        resource_version: rv,
    });
}
