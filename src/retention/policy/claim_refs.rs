//! The owner references a claim should carry under its set's policy, and the change from the
//! ones it has.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::orphaned_claims::sweep_claim;
use super::{Action, Plan, PolicyType, Regarding, Scope};
use crate::retention::names::{claim_identity, pod_name};
use crate::retention::owners::{is_controller, Owner};

/// Brings one claim's owner references in line with the policy.
pub(super) fn plan_claim(scope: &Scope<'_>, claim: &PersistentVolumeClaim, plan: &mut Plan) {
    let Some(claim_name) = claim.metadata.name.as_deref() else {
        return;
    };
    let Some((_, ordinal)) = claim_identity(scope.obs.set, claim_name) else {
        return;
    };
    // A dying claim cannot be saved by its references; `hold_pod` keeps pods off it.
    if claim.metadata.deletion_timestamp.is_some() {
        return;
    }
    let Some(resource_version) = claim.metadata.resource_version.clone() else {
        return;
    };
    let refs = claim.metadata.owner_references.clone().unwrap_or_default();
    let set_owner = &scope.set_owner;
    // An earlier set of the same name owns it: leave it to that owner (or the collector).
    if refs.iter().any(|r| set_owner.is_stale(r)) {
        return;
    }
    let in_range = scope.range.contains(ordinal);
    let pod = scope.pods.get(&ordinal);
    let pod_owner = Owner::pod(
        pod_name(scope.set_name, ordinal),
        pod.and_then(|p| p.metadata.uid.clone()),
    );

    if !in_range && pod.is_none() {
        sweep_claim(scope, claim, &refs, &pod_owner, plan);
        return;
    }
    let stale_pod_ref = refs.iter().any(|r| pod_owner.is_stale(r));
    // Out of range, a reference to an earlier pod is upstream's "leave it alone" case.
    if stale_pod_ref && !in_range {
        return;
    }
    let foreign_controller = refs
        .iter()
        .any(|r| is_controller(r) && !set_owner.named_by(r) && !pod_owner.named_by(r));

    let mut messages = Vec::new();
    // Reattach guard: an in-range claim never keeps a pod reference. One to an earlier (or a
    // terminating) pod would let the collector delete the claim under the pod coming back.
    let pod_refs_in_range = in_range && refs.iter().any(|r| pod_owner.named_by(r));
    if pod_refs_in_range {
        let terminating = pod.is_some_and(|p| p.metadata.deletion_timestamp.is_some());
        if stale_pod_ref || terminating {
            messages.push(format!(
                "removed the reference to an earlier or terminating pod {} so the claim is reused when ordinal {ordinal} comes back",
                pod_owner.name
            ));
        }
    }

    // The built-in controller owns every owner reference of the claim: Kennel never writes
    // what it writes (two writers of one list conflict and race each other). `hold_pod` still
    // keeps pods off a claim the collector is deleting.
    if !scope.writes_refs {
        return;
    }
    let new_refs = {
        let (mut want_set, mut want_pod) =
            match (scope.policy.when_deleted, scope.policy.when_scaled) {
                (PolicyType::Retain, PolicyType::Retain) => (false, false),
                (PolicyType::Delete, PolicyType::Retain) => (true, false),
                (PolicyType::Retain, PolicyType::Delete) => (false, !in_range),
                (PolicyType::Delete, PolicyType::Delete) => (in_range, !in_range),
            };
        if foreign_controller && !scope.policy.retains_all() {
            want_set = false;
            want_pod = false;
            plan.event(
                true,
                "ConflictingController",
                "Plan",
                Regarding::Claim(claim_name.to_string()),
                format!(
                    "PersistentVolumeClaim {claim_name} has a conflicting OwnerReference that acts as a managing controller, the retention policy is ignored for this claim"
                ),
            );
        }
        desired_refs(&refs, set_owner, &pod_owner, want_set, want_pod)
    };
    if new_refs == refs {
        return;
    }
    messages.push(describe_change(&refs, &new_refs, set_owner, &pod_owner));
    let reason = if pod_refs_in_range && messages.len() > 1 {
        "StaleOwnerRemoved"
    } else {
        "ClaimOwnersUpdated"
    };
    plan.event(
        false,
        reason,
        "UpdateOwnerReferences",
        Regarding::Claim(claim_name.to_string()),
        format!(
            "PersistentVolumeClaim {claim_name} (ordinal {ordinal}, {}, {}): {}",
            if in_range { "in range" } else { "condemned" },
            scope.policy.describe(),
            messages.join("; ")
        ),
    );
    plan.actions.push(Action::SetClaimOwners {
        claim: claim_name.to_string(),
        resource_version,
        owner_references: new_refs,
    });
}

/// The claim's references with ours replaced by exactly the wanted controller references.
/// Other owners keep their place; duplicates and pre-1.31 non-controller refs of ours are
/// dropped and, when wanted, written again as controller references.
pub(super) fn desired_refs(
    refs: &[OwnerReference],
    set: &Owner,
    pod: &Owner,
    want_set: bool,
    want_pod: bool,
) -> Vec<OwnerReference> {
    let (mut have_set, mut have_pod) = (false, false);
    let mut out = Vec::with_capacity(refs.len() + 1);
    for r in refs {
        if set.named_by(r) {
            if want_set && !have_set && set.is(r) && is_controller(r) {
                have_set = true;
                out.push(r.clone());
            }
        } else if pod.named_by(r) {
            if want_pod && !have_pod && pod.is(r) && is_controller(r) {
                have_pod = true;
                out.push(r.clone());
            }
        } else {
            out.push(r.clone());
        }
    }
    if want_set && !have_set {
        out.extend(set.controller_ref());
    }
    if want_pod && !have_pod {
        out.extend(pod.controller_ref());
    }
    out
}

pub(super) fn describe_change(
    old: &[OwnerReference],
    new: &[OwnerReference],
    set: &Owner,
    pod: &Owner,
) -> String {
    let label = |r: &OwnerReference| {
        let who = if set.named_by(r) {
            "StatefulSet"
        } else if pod.named_by(r) {
            "Pod"
        } else {
            r.kind.as_str()
        };
        format!("{who} {}", r.name)
    };
    let added: Vec<String> = new.iter().filter(|r| !old.contains(r)).map(label).collect();
    let removed: Vec<String> = old.iter().filter(|r| !new.contains(r)).map(label).collect();
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("owner set to {}", added.join(", ")));
    }
    if !removed.is_empty() {
        parts.push(format!("owner reference removed: {}", removed.join(", ")));
    }
    parts.join("; ")
}
