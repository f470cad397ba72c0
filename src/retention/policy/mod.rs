//! The retention planner: a pure function from what the cluster looks like to what to change.
//!
//! [`plan`] takes one StatefulSet with the claims, pods, volumes and nodes around it and returns
//! the writes and events that bring its claims to the state Kubernetes' own StatefulSet controller
//! (KEP-1847, 1.31+ controller references) would leave them in, plus the extra guards Kennel adds:
//! the reattach guard, stamping the set reference as soon as a claim appears, node-loss recovery
//! and the opt-in sweep of claims whose condemned pod vanished before it was referenced.
//!
//! Nothing here talks to the API server; `controller.rs` executes the plan.
//!
//! One room per decision: [`plan_model`] holds what the planner reads and writes, `claim_refs` the
//! owner references a claim should carry, `reattach_guard` keeps a recreated pod off a dying
//! claim, `recovery` recreates claims stranded on a lost node and cleans their volumes,
//! `orphaned_claims` deletes the out-of-range claims upstream keeps forever, `migration` moves a
//! drained node's claims to another node. This file walks one set through them.

mod claim_refs;
mod migration;
mod orphaned_claims;
mod plan_model;
mod reattach_guard;
mod recovery;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};

pub use plan_model::*;

use super::names::{pod_ordinal, OrdinalRange};
use super::owners::{is_controller, Owner};
use claim_refs::plan_claim;
use reattach_guard::hold_pod;
use recovery::{clean_stale_volume, recover_from_node_loss};

/// Everything the per-claim and per-pod steps share.
struct Scope<'a> {
    obs: Observed<'a>,
    opts: &'a Options,
    set_name: &'a str,
    set_owner: Owner,
    policy: EffectivePolicy,
    range: OrdinalRange,
    /// Kennel writes the basic references itself (else the built-in controller does).
    writes_refs: bool,
    pods: BTreeMap<u32, &'a Pod>,
    claims: BTreeMap<&'a str, &'a PersistentVolumeClaim>,
}

/// Plans the changes for one StatefulSet.
pub fn plan(obs: Observed<'_>, opts: &Options) -> Plan {
    let mut plan = Plan::default();
    let set = obs.set;
    let (Some(set_name), Some(set_uid)) =
        (set.metadata.name.as_deref(), set.metadata.uid.as_deref())
    else {
        return plan;
    };
    // While the set is being deleted the garbage collector decides; any write could race it.
    if set.metadata.deletion_timestamp.is_some() {
        return plan;
    }
    let policy = EffectivePolicy::of(set);
    let scope = Scope {
        obs,
        opts,
        set_name,
        set_owner: Owner::set(set_name, set_uid),
        policy,
        range: OrdinalRange::of(set),
        writes_refs: !opts.builtin || policy.source != Source::Field,
        pods: controlled_pods(obs.pods, set_name, set_uid),
        claims: obs
            .claims
            .iter()
            .filter(|c| c.metadata.namespace == set.metadata.namespace)
            .filter_map(|c| Some((c.metadata.name.as_deref()?, *c)))
            .collect(),
    };

    if let Some(message) = ignored_annotations(set, &policy) {
        plan.event(
            true,
            "RetentionAnnotationsIgnored",
            "Plan",
            Regarding::StatefulSet,
            message,
        );
    }
    for claim in scope.claims.values() {
        plan_claim(&scope, claim, &mut plan);
    }
    for (&ordinal, pod) in &scope.pods {
        if scope.range.contains(ordinal) && !hold_pod(&scope, ordinal, pod, &mut plan) {
            recover_from_node_loss(&scope, ordinal, pod, &mut plan);
        }
    }
    migration::plan_migrations(&scope, &mut plan);
    for pv in obs.volumes {
        clean_stale_volume(&scope, pv, &mut plan);
    }
    plan
}

/// Pods the set controls, by ordinal.
fn controlled_pods<'a>(pods: &[&'a Pod], set_name: &str, set_uid: &str) -> BTreeMap<u32, &'a Pod> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| is_controller(r) && r.uid == set_uid && r.kind == "StatefulSet")
        })
        .filter_map(|p| Some((pod_ordinal(set_name, p.metadata.name.as_deref()?)?, *p)))
        .collect()
}

fn ignored_annotations(set: &StatefulSet, policy: &EffectivePolicy) -> Option<String> {
    if policy.source != Source::Field {
        return None;
    }
    let annotations = set.metadata.annotations.as_ref()?;
    let differs = |key: &str, field: PolicyType| {
        annotations
            .get(key)
            .is_some_and(|v| PolicyType::parse(Some(v)) != field)
    };
    (differs(WHEN_DELETED_ANNOTATION, policy.when_deleted)
        || differs(WHEN_SCALED_ANNOTATION, policy.when_scaled))
    .then(|| {
        format!(
            "spec.persistentVolumeClaimRetentionPolicy is set ({}); the {} / {} annotations apply only where the API server drops that field",
            policy.describe(),
            WHEN_DELETED_ANNOTATION,
            WHEN_SCALED_ANNOTATION
        )
    })
}

#[cfg(test)]
mod tests;
