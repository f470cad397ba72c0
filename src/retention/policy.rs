//! The retention planner: a pure function from what the cluster looks like to what to change.
//!
//! [`plan`] takes one StatefulSet with the claims, pods, volumes and nodes around it and returns
//! the writes and events that bring its claims to the state Kubernetes' own StatefulSet controller
//! (KEP-1847, 1.31+ controller references) would leave them in, plus the extra guards Kennel adds:
//! the reattach guard, stamping the set reference as soon as a claim appears, node-loss recovery
//! and the opt-in sweep of claims whose condemned pod vanished before it was referenced.
//!
//! Nothing here talks to the API server; `controller.rs` executes the plan.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;

use super::names::{claim_identity, claim_name, pod_name, pod_ordinal, templates, OrdinalRange};
use super::nodeloss::{
    identity_change, pinned_node, pv_driver, unscheduled_since, verdict, NodeVerdict, NodeView,
};
use super::owners::{is_controller, Owner};

/// Annotation carrying `whenDeleted` where the API server dropped the spec field.
pub const WHEN_DELETED_ANNOTATION: &str = "kennel.csi.dev/when-deleted";
/// Annotation carrying `whenScaled` where the API server dropped the spec field.
pub const WHEN_SCALED_ANNOTATION: &str = "kennel.csi.dev/when-scaled";
/// Per-set opt-in for node-loss recovery: `recreate`, or `wait` (the default).
pub const ON_NODE_LOSS_ANNOTATION: &str = "kennel.csi.dev/on-node-loss";
/// Finalizer csi-provisioner puts on PVs it must delete; nobody removes it once the node is gone.
pub const PROVISIONER_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyType {
    Retain,
    Delete,
}

impl PolicyType {
    /// Anything but the exact string `Delete` counts as Retain, as upstream treats unknown values.
    fn parse(value: Option<&str>) -> Self {
        match value {
            Some("Delete") => PolicyType::Delete,
            _ => PolicyType::Retain,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            PolicyType::Retain => "Retain",
            PolicyType::Delete => "Delete",
        }
    }
}

/// Where the effective policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `spec.persistentVolumeClaimRetentionPolicy`. Servers that know the field default it, so its
    /// absence means the server dropped it.
    Field,
    /// Kennel's annotations, used only when the field is absent.
    Annotations,
    /// Neither: Retain/Retain.
    Default,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub when_deleted: PolicyType,
    pub when_scaled: PolicyType,
    pub source: Source,
}

impl EffectivePolicy {
    pub fn of(set: &StatefulSet) -> Self {
        let field = set
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref());
        if let Some(p) = field {
            return Self {
                when_deleted: PolicyType::parse(p.when_deleted.as_deref()),
                when_scaled: PolicyType::parse(p.when_scaled.as_deref()),
                source: Source::Field,
            };
        }
        let annotation = |key: &str| {
            set.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(String::as_str)
        };
        let (deleted, scaled) = (
            annotation(WHEN_DELETED_ANNOTATION),
            annotation(WHEN_SCALED_ANNOTATION),
        );
        Self {
            when_deleted: PolicyType::parse(deleted),
            when_scaled: PolicyType::parse(scaled),
            source: if deleted.is_some() || scaled.is_some() {
                Source::Annotations
            } else {
                Source::Default
            },
        }
    }

    fn retains_all(&self) -> bool {
        self.when_deleted == PolicyType::Retain && self.when_scaled == PolicyType::Retain
    }

    fn describe(&self) -> String {
        format!(
            "whenDeleted={}, whenScaled={}",
            self.when_deleted.as_str(),
            self.when_scaled.as_str()
        )
    }
}

/// Settings that shape the plan.
#[derive(Clone, Debug)]
pub struct Options {
    /// The API server's StatefulSet controller enforces the policy written in the spec field.
    pub builtin: bool,
    /// Delete out-of-range claims whose pod vanished before a pod reference was written.
    pub sweep_orphaned_claims: bool,
    /// How long a pod waits on a lost node before its claim is recreated.
    pub node_loss_grace: Duration,
    /// CSI driver name of Kennel volumes.
    pub driver_name: String,
    pub now: Timestamp,
}

/// The cluster objects around one StatefulSet. Objects that do not belong to it are ignored, so
/// callers may pass everything in the namespace.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub set: &'a StatefulSet,
    pub claims: &'a [&'a PersistentVolumeClaim],
    pub pods: &'a [&'a Pod],
    pub volumes: &'a [&'a PersistentVolume],
    pub nodes: &'a NodeView,
}

/// The object an event is about: the one acted on, so that two actions with the same reason
/// (two claims deleted) stay two events instead of one merged series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Regarding {
    StatefulSet,
    Claim(String),
    Pod(String),
    Volume(String),
}

/// One event to publish (and log) before the writes it announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    /// What was done to `regarding` (the event's `action`), e.g. `DeleteClaim`.
    pub action: &'static str,
    pub message: String,
    pub regarding: Regarding,
}

/// One change to make. Writes carry the preconditions the API server must check.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Replace the claim's ownerReferences, if its resourceVersion is still `resource_version`.
    SetClaimOwners {
        claim: String,
        resource_version: String,
        owner_references: Vec<OwnerReference>,
    },
    DeleteClaim {
        claim: String,
        uid: String,
        resource_version: String,
    },
    DeletePod {
        pod: String,
        uid: String,
    },
    /// Replace a PV's finalizers, if its resourceVersion is still `resource_version`.
    SetVolumeFinalizers {
        volume: String,
        resource_version: String,
        finalizers: Vec<String>,
    },
    DeleteVolume {
        volume: String,
        uid: String,
    },
    Event(Note),
}

impl Action {
    pub fn is_write(&self) -> bool {
        !matches!(self, Action::Event(_))
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Plan again after this long even if nothing changes (a grace period is running).
    pub requeue_after: Option<Duration>,
    /// Nodes missing from the cache whose absence must be confirmed by an uncached GET before
    /// anything is decided about their volumes.
    pub unconfirmed_nodes: Vec<String>,
    /// NotReady nodes past the grace period whose CSINode must be read (uncached) to learn
    /// whether Kennel's driver is still registered there.
    pub unconfirmed_drivers: Vec<String>,
}

impl Plan {
    pub fn has_writes(&self) -> bool {
        self.actions.iter().any(Action::is_write)
    }

    fn event(
        &mut self,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        regarding: Regarding,
        message: String,
    ) {
        self.actions.push(Action::Event(Note {
            warning,
            reason,
            action,
            message,
            regarding,
        }));
    }

    fn requeue(&mut self, after: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(after, |d| d.min(after)));
    }

    fn unconfirmed(&mut self, node: String) {
        if !self.unconfirmed_nodes.contains(&node) {
            self.unconfirmed_nodes.push(node);
        }
    }

    fn unconfirmed_driver(&mut self, node: String) {
        if !self.unconfirmed_drivers.contains(&node) {
            self.unconfirmed_drivers.push(node);
        }
    }
}

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

/// Brings one claim's owner references in line with the policy.
fn plan_claim(scope: &Scope<'_>, claim: &PersistentVolumeClaim, plan: &mut Plan) {
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
fn desired_refs(
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

fn describe_change(
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

/// Opt-in: an out-of-range claim whose pod vanished before a pod reference was written is kept by
/// upstream forever; with whenScaled=Delete the sweep deletes it.
fn sweep_claim(
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

/// Keeps an in-range pod off a Terminating claim. Returns true when the pod is being held.
fn hold_pod(scope: &Scope<'_>, ordinal: u32, pod: &Pod, plan: &mut Plan) -> bool {
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

/// Recreates the claims of a pod stuck because its node-local volume's node is gone (see
/// `nodeloss` for what counts as evidence). Every claim it deletes is named in an event, and
/// so in the log, before the delete.
fn recover_from_node_loss(scope: &Scope<'_>, ordinal: u32, pod: &Pod, plan: &mut Plan) {
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

fn find_volume<'a>(volumes: &[&'a PersistentVolume], name: &str) -> Option<&'a PersistentVolume> {
    volumes
        .iter()
        .find(|pv| pv.metadata.name.as_deref() == Some(name))
        .copied()
}

/// A Released Kennel PV of one of the set's claims whose Node object is confirmed deleted can
/// never be cleaned by its provisioner: drop the provisioner's finalizer and delete it
/// (reclaimPolicy Delete only; Retain keeps it for the administrator). A node that still exists,
/// in any state, runs (or will run again) a provisioner that deletes the volume itself.
fn clean_stale_volume(scope: &Scope<'_>, pv: &PersistentVolume, plan: &mut Plan) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::fixtures::*;
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::api::storage::v1::CSINode;

    const GRACE: Duration = Duration::from_secs(300);

    fn opts(builtin: bool) -> Options {
        Options {
            builtin,
            sweep_orphaned_claims: false,
            node_loss_grace: GRACE,
            driver_name: DRIVER.into(),
            now: ts(0),
        }
    }

    struct World {
        set: StatefulSet,
        claims: Vec<PersistentVolumeClaim>,
        pods: Vec<Pod>,
        volumes: Vec<PersistentVolume>,
        nodes: Vec<Node>,
        gone: Vec<&'static str>,
        /// CSINodes read uncached (`None`: the GET answered 404).
        csinodes: Vec<(&'static str, Option<CSINode>)>,
    }

    fn world(set: StatefulSet, claims: Vec<PersistentVolumeClaim>, pods: Vec<Pod>) -> World {
        World {
            set,
            claims,
            pods,
            volumes: vec![],
            nodes: vec![],
            gone: vec![],
            csinodes: vec![],
        }
    }

    impl World {
        fn plan(&self, opts: &Options) -> Plan {
            let claims: Vec<&PersistentVolumeClaim> = self.claims.iter().collect();
            let pods: Vec<&Pod> = self.pods.iter().collect();
            let volumes: Vec<&PersistentVolume> = self.volumes.iter().collect();
            let mut nodes = NodeView::from_nodes(&self.nodes);
            for name in &self.gone {
                nodes.confirm_gone(name);
            }
            for (name, csinode) in &self.csinodes {
                nodes.record_csinode(name, csinode.as_ref(), DRIVER);
            }
            plan(
                Observed {
                    set: &self.set,
                    claims: &claims,
                    pods: &pods,
                    volumes: &volumes,
                    nodes: &nodes,
                },
                opts,
            )
        }

        /// Applies the claim writes as the API server would (resourceVersion checked).
        fn apply(&mut self, plan: &Plan) {
            for action in &plan.actions {
                match action {
                    Action::SetClaimOwners {
                        claim,
                        resource_version,
                        owner_references,
                    } => {
                        let c = self
                            .claims
                            .iter_mut()
                            .find(|c| c.metadata.name.as_deref() == Some(claim.as_str()))
                            .expect("claim exists");
                        assert_eq!(c.metadata.resource_version.as_ref(), Some(resource_version));
                        c.metadata.owner_references =
                            (!owner_references.is_empty()).then(|| owner_references.clone());
                        let next: u64 = resource_version.parse::<u64>().expect("numeric") + 1000;
                        c.metadata.resource_version = Some(next.to_string());
                    }
                    Action::DeleteClaim { claim, .. } => self
                        .claims
                        .retain(|c| c.metadata.name.as_deref() != Some(claim.as_str())),
                    Action::DeletePod { pod, .. } => self
                        .pods
                        .retain(|p| p.metadata.name.as_deref() != Some(pod.as_str())),
                    _ => {}
                }
            }
        }
    }

    /// (kind, name, uid, controller) of each ref, for compact assertions.
    type Summary = Vec<(String, String, String, bool)>;

    fn summary(refs: &[OwnerReference]) -> Summary {
        refs.iter()
            .map(|r| {
                (
                    r.kind.clone(),
                    r.name.clone(),
                    r.uid.clone(),
                    r.controller == Some(true),
                )
            })
            .collect()
    }

    fn written(plan: &Plan, ordinal: u32) -> Option<Summary> {
        let name = format!("data-web-{ordinal}");
        plan.actions.iter().find_map(|a| match a {
            Action::SetClaimOwners {
                claim,
                owner_references,
                ..
            } if *claim == name => Some(summary(owner_references)),
            _ => None,
        })
    }

    fn s(r: OwnerReference) -> (String, String, String, bool) {
        summary(&[r]).remove(0)
    }

    fn reasons(plan: &Plan) -> Vec<&'static str> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(n) => Some(n.reason),
                _ => None,
            })
            .collect()
    }

    fn writes(plan: &Plan) -> Vec<&Action> {
        plan.actions.iter().filter(|a| a.is_write()).collect()
    }

    const POLICIES: [(&str, &str); 4] = [
        ("Retain", "Retain"),
        ("Delete", "Retain"),
        ("Retain", "Delete"),
        ("Delete", "Delete"),
    ];

    #[test]
    fn all_four_policies_on_create() {
        // (policy, refs expected on an in-range claim)
        let table: [(_, Option<Summary>); 4] = [
            (POLICIES[0], None),
            (POLICIES[1], Some(vec![s(set_ref())])),
            (POLICIES[2], None),
            (POLICIES[3], Some(vec![s(set_ref())])),
        ];
        for (policy, expected) in table {
            let w = world(
                set(2, Some(policy)),
                vec![claim(0, vec![]), claim(1, vec![])],
                vec![pod(0), pod(1)],
            );
            let p = w.plan(&opts(false));
            for ordinal in 0..2 {
                assert_eq!(
                    written(&p, ordinal),
                    expected,
                    "{policy:?} ordinal {ordinal}"
                );
            }
        }
    }

    #[test]
    fn all_four_policies_on_scale_down() {
        // 3 -> 1: pods 1 and 2 are condemned but still exist; claims carry what creation wrote.
        let table: [(_, Option<Summary>); 4] = [
            (POLICIES[0], None),
            (POLICIES[1], None), // set ref already there for condemned claims too
            (POLICIES[2], Some(vec![s(pod_ref(2))])),
            (POLICIES[3], Some(vec![s(pod_ref(2))])), // set ref removed in the same write
        ];
        for (policy, expected) in table {
            let created = if policy.0 == "Delete" {
                vec![set_ref()]
            } else {
                vec![]
            };
            let w = world(
                set(1, Some(policy)),
                (0..3).map(|o| claim(o, created.clone())).collect(),
                (0..3).map(pod).collect(),
            );
            let p = w.plan(&opts(false));
            assert_eq!(written(&p, 0), None, "{policy:?} keeps ordinal 0");
            assert_eq!(written(&p, 2), expected, "{policy:?} condemned ordinal 2");
            assert_eq!(written(&p, 1).is_some(), expected.is_some());
        }
    }

    #[test]
    fn scale_three_to_one_to_three_reattaches_retained_claims() {
        for policy in [POLICIES[2], POLICIES[3]] {
            let created = if policy.0 == "Delete" {
                vec![set_ref()]
            } else {
                vec![]
            };
            let mut w = world(
                set(1, Some(policy)),
                (0..3).map(|o| claim(o, created.clone())).collect(),
                (0..3).map(pod).collect(),
            );
            let p = w.plan(&opts(false));
            w.apply(&p);
            assert_eq!(
                w.claims[2].metadata.owner_references,
                Some(vec![pod_ref(2)])
            );
            // The condemned pods go, the collector has not acted yet, and the set scales back up.
            w.pods.truncate(1);
            w.set = set(3, Some(policy));
            let p = w.plan(&opts(false));
            let expected = if policy.0 == "Delete" {
                Some(vec![s(set_ref())])
            } else {
                Some(vec![])
            };
            assert_eq!(written(&p, 1), expected, "{policy:?}");
            assert_eq!(written(&p, 2), expected, "{policy:?}");
            assert!(reasons(&p).contains(&"StaleOwnerRemoved"));
            w.apply(&p);
            // New pods with new UIDs arrive: nothing more to do.
            w.pods
                .extend([pod_with_uid(1, "uid-new-1"), pod_with_uid(2, "uid-new-2")]);
            assert_eq!(
                writes(&w.plan(&opts(false))),
                Vec::<&Action>::new(),
                "{policy:?}"
            );
        }
    }

    #[test]
    fn scale_down_and_back_up_before_condemned_pod_is_gone() {
        let policy = POLICIES[3];
        let w = world(
            set(3, Some(policy)),
            vec![claim(0, vec![set_ref()]), claim(1, vec![pod_ref(1)])],
            vec![pod(0), terminating(pod(1))],
        );
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 1), Some(vec![s(set_ref())]));
        assert!(reasons(&p).contains(&"StaleOwnerRemoved"));
        // With the built-in controller on, the references are its own: Kennel writes none.
        let p = w.plan(&opts(true));
        assert_eq!(writes(&p), Vec::<&Action>::new());
    }

    #[test]
    fn pod_deleted_or_evicted_before_its_ref_was_written() {
        // Ordinal 2 is out of range and its pod vanished before a pod ref was written.
        let mut w = world(
            set(2, Some(POLICIES[2])),
            vec![claim(0, vec![]), claim(1, vec![]), claim(2, vec![])],
            vec![pod(0)], // pod 1 was evicted: in range, no pod right now
        );
        let p = w.plan(&opts(false));
        assert_eq!(p.actions, vec![], "claims are kept, as upstream does");

        w.set = set(2, Some(POLICIES[2]));
        let mut o = opts(false);
        o.sweep_orphaned_claims = true;
        let p = w.plan(&o);
        assert_eq!(
            writes(&p),
            vec![&Action::DeleteClaim {
                claim: "data-web-2".into(),
                uid: claim_uid(2),
                resource_version: "102".into()
            }]
        );
        assert_eq!(reasons(&p), vec!["OrphanedClaimDeleted"]);

        // The sweep leaves claims alone under whenScaled=Retain, or when a pod ref exists.
        w.set = set(2, Some(POLICIES[1]));
        w.claims[2] = claim(2, vec![set_ref()]);
        let swept = |p: &Plan| {
            p.actions
                .iter()
                .any(|a| matches!(a, Action::DeleteClaim { .. }))
        };
        assert!(!swept(&w.plan(&o)));
        w.set = set(2, Some(POLICIES[2]));
        w.claims[2] = claim(2, vec![pod_ref_uid(2, "uid-gone")]);
        assert!(writes(&w.plan(&o)).is_empty());
    }

    #[test]
    fn controller_restart_mid_scale_down_finishes_without_duplicates() {
        // 4 -> 1 under Delete/Delete; the previous run updated claim 1 only.
        let mut w = world(
            set(1, Some(POLICIES[3])),
            vec![
                claim(0, vec![set_ref()]),
                claim(1, vec![pod_ref(1)]),
                claim(2, vec![set_ref()]),
                claim(3, vec![set_ref(), pod_ref(3)]), // half-written by someone else
            ],
            (0..4).map(pod).collect(),
        );
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 1), None);
        assert_eq!(written(&p, 2), Some(vec![s(pod_ref(2))]));
        assert_eq!(written(&p, 3), Some(vec![s(pod_ref(3))]));
        w.apply(&p);
        for _ in 0..2 {
            assert!(
                writes(&w.plan(&opts(false))).is_empty(),
                "resync is idempotent"
            );
        }
    }

    #[test]
    fn duplicate_refs_collapse_to_one() {
        let w = world(
            set(1, Some(POLICIES[1])),
            vec![claim(0, vec![set_ref(), set_ref()])],
            vec![pod(0)],
        );
        assert_eq!(written(&w.plan(&opts(false)), 0), Some(vec![s(set_ref())]));
    }

    #[test]
    fn policy_changed_both_ways() {
        // Retain/Retain -> Delete/Delete with ordinal 1 condemned.
        let mut w = world(
            set(1, Some(POLICIES[3])),
            vec![claim(0, vec![]), claim(1, vec![])],
            vec![pod(0), pod(1)],
        );
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 0), Some(vec![s(set_ref())]));
        assert_eq!(written(&p, 1), Some(vec![s(pod_ref(1))]));
        w.apply(&p);
        // ... and back to Retain/Retain: every ref of ours goes, others stay.
        w.set = set(1, Some(POLICIES[0]));
        w.claims[0]
            .metadata
            .owner_references
            .get_or_insert_with(Vec::new)
            .insert(0, foreign_ref(false));
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 0), Some(vec![s(foreign_ref(false))]));
        assert_eq!(written(&p, 1), Some(vec![]));
        // Delete/Delete -> Delete/Retain moves the condemned claim from pod ref to set ref.
        let w2 = world(
            set(1, Some(POLICIES[1])),
            vec![claim(0, vec![set_ref()]), claim(1, vec![pod_ref(1)])],
            vec![pod(0), pod(1)],
        );
        let p = w2.plan(&opts(false));
        assert_eq!(written(&p, 0), None);
        assert_eq!(written(&p, 1), Some(vec![s(set_ref())]));
    }

    #[test]
    fn foreign_controller_keeps_the_claim() {
        let w = world(
            set(1, Some(POLICIES[3])),
            vec![
                claim(0, vec![set_ref(), foreign_ref(true)]),
                claim(1, vec![foreign_ref(true)]),
            ],
            vec![pod(0), pod(1)],
        );
        let p = w.plan(&opts(false));
        assert_eq!(
            written(&p, 0),
            Some(vec![s(foreign_ref(true))]),
            "ours removed"
        );
        assert_eq!(written(&p, 1), None, "none added");
        assert_eq!(
            reasons(&p)
                .iter()
                .filter(|r| **r == "ConflictingController")
                .count(),
            2
        );
        // Retain/Retain: a foreign controller is no conflict.
        let w = world(
            set(1, Some(POLICIES[0])),
            vec![claim(0, vec![foreign_ref(true)])],
            vec![pod(0)],
        );
        assert!(w.plan(&opts(false)).actions.is_empty());
        // With the built-in controller on, Kennel does not stamp a set ref next to it.
        let w = world(
            set(1, Some(POLICIES[1])),
            vec![claim(0, vec![foreign_ref(true)])],
            vec![],
        );
        assert!(w.plan(&opts(true)).actions.is_empty());
    }

    #[test]
    fn non_controller_foreign_owner_is_kept_beside_ours() {
        let w = world(
            set(1, Some(POLICIES[1])),
            vec![claim(0, vec![foreign_ref(false)])],
            vec![pod(0)],
        );
        let p = w.plan(&opts(false));
        assert_eq!(
            written(&p, 0),
            Some(vec![s(foreign_ref(false)), s(set_ref())])
        );
        assert!(!reasons(&p).contains(&"ConflictingController"));
    }

    #[test]
    fn stale_uid_refs_leave_the_claim_alone() {
        // The set was deleted with orphan propagation and recreated: claims point at the old UID.
        let w = world(
            set(1, Some(POLICIES[3])),
            vec![
                claim(0, vec![set_ref_uid("uid-old-set")]),
                claim(1, vec![set_ref_uid("uid-old-set")]),
            ],
            vec![pod(0), pod(1)],
        );
        assert!(w.plan(&opts(false)).actions.is_empty());
        // A condemned claim referencing an earlier pod is left to the collector.
        let w = world(
            set(1, Some(POLICIES[2])),
            vec![claim(1, vec![pod_ref_uid(1, "uid-earlier")])],
            vec![pod(0), pod(1)],
        );
        assert!(w.plan(&opts(false)).actions.is_empty());
    }

    #[test]
    fn pre_131_refs_are_upgraded_to_controller_refs() {
        let w = world(
            set(1, Some(POLICIES[3])),
            vec![
                claim(0, vec![plain(set_ref())]),
                claim(1, vec![plain(pod_ref(1))]),
            ],
            vec![pod(0), pod(1)],
        );
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 0), Some(vec![s(set_ref())]));
        assert_eq!(written(&p, 1), Some(vec![s(pod_ref(1))]));
        // Retain/Retain removes them instead.
        let w = world(
            set(1, Some(POLICIES[0])),
            vec![claim(0, vec![plain(set_ref())])],
            vec![pod(0)],
        );
        assert_eq!(written(&w.plan(&opts(false)), 0), Some(vec![]));
    }

    #[test]
    fn nothing_changes_while_the_set_is_deleted() {
        for finalizer in [None, Some("foregroundDeletion"), Some("orphan")] {
            let w = world(
                deleting(set(1, Some(POLICIES[3])), finalizer),
                vec![
                    claim(0, vec![]),
                    claim(1, vec![set_ref()]),
                    claim_terminating(claim(2, vec![])),
                ],
                vec![unschedulable(pod(0), ts(-3600)), pod(1)],
            );
            let mut o = opts(false);
            o.sweep_orphaned_claims = true;
            assert_eq!(w.plan(&o), Plan::default(), "{finalizer:?}");
        }
    }

    #[test]
    fn raising_ordinals_start_condemns_the_low_ordinals() {
        let w = world(
            start_at(set(3, Some(POLICIES[3])), 2),
            (0..5)
                .map(|o| claim(o, if o < 3 { vec![set_ref()] } else { vec![] }))
                .collect(),
            (0..5).map(pod).collect(),
        );
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 0), Some(vec![s(pod_ref(0))]));
        assert_eq!(written(&p, 1), Some(vec![s(pod_ref(1))]));
        assert_eq!(written(&p, 2), None);
        assert_eq!(written(&p, 3), Some(vec![s(set_ref())]));
        assert_eq!(written(&p, 4), Some(vec![s(set_ref())]));
    }

    #[test]
    fn unknown_policy_values_count_as_retain() {
        let w = world(
            set(1, Some(("Destroy", "delete"))),
            vec![claim(0, vec![set_ref()]), claim(1, vec![])],
            vec![pod(0), pod(1)],
        );
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 0), Some(vec![]));
        assert_eq!(written(&p, 1), None);
    }

    #[test]
    fn builtin_on_leaves_basic_refs_to_kubernetes() {
        let w = world(
            set(1, Some(POLICIES[3])),
            vec![
                claim(0, vec![]),
                claim(1, vec![set_ref()]),
                claim(2, vec![plain(set_ref())]),
            ],
            vec![pod(0), pod(1)],
        );
        // Every owner reference is the built-in controller's job: two writers of one list
        // conflict (409s on both sides) and race each other.
        let p = w.plan(&opts(true));
        assert_eq!(writes(&p), Vec::<&Action>::new());
        assert_eq!(reasons(&p), Vec::<&str>::new());
        // Off: Kennel does all of it.
        let p = w.plan(&opts(false));
        assert_eq!(written(&p, 1), Some(vec![s(pod_ref(1))]));
    }

    #[test]
    fn set_ref_is_stamped_before_the_pod_exists() {
        let w = world(
            set(3, Some(POLICIES[1])),
            vec![claim(2, vec![])],
            vec![pod(0), pod(1)],
        );
        assert_eq!(written(&w.plan(&opts(false)), 2), Some(vec![s(set_ref())]));
        // The built-in controller stamps it itself; a second writer raced it.
        assert_eq!(written(&w.plan(&opts(true)), 2), None);
    }

    #[test]
    fn annotations_apply_only_where_the_field_was_dropped() {
        let annotated = |s: StatefulSet| {
            annotate(
                annotate(s, WHEN_DELETED_ANNOTATION, "Delete"),
                WHEN_SCALED_ANNOTATION,
                "Delete",
            )
        };
        // Field absent: the server dropped it, so the built-in controller is not enforcing
        // anything and Kennel writes the refs from the annotations even in builtin mode.
        for builtin in [false, true] {
            let w = world(
                annotated(set(1, None)),
                vec![claim(0, vec![]), claim(1, vec![])],
                vec![pod(0), pod(1)],
            );
            let p = w.plan(&opts(builtin));
            assert_eq!(
                written(&p, 0),
                Some(vec![s(set_ref())]),
                "builtin={builtin}"
            );
            assert_eq!(
                written(&p, 1),
                Some(vec![s(pod_ref(1))]),
                "builtin={builtin}"
            );
        }
        // Field present (Retain/Retain): annotations are ignored, with a warning.
        let w = world(
            annotated(set(1, Some(POLICIES[0]))),
            vec![claim(0, vec![]), claim(1, vec![])],
            vec![pod(0), pod(1)],
        );
        for builtin in [false, true] {
            let p = w.plan(&opts(builtin));
            assert!(writes(&p).is_empty());
            assert_eq!(reasons(&p), vec!["RetentionAnnotationsIgnored"]);
        }
        // Neither: Retain/Retain.
        assert_eq!(EffectivePolicy::of(&set(1, None)).source, Source::Default);
    }

    #[test]
    fn pod_never_starts_on_a_terminating_claim() {
        // The collector won the race: claim 1 is terminating while the new pod 1 waits.
        let stale = vec![pod_ref_uid(1, "uid-earlier")];
        let mut pending = unschedulable(pod_with_uid(1, "uid-new"), ts(-10));
        pending.spec = None;
        let w = world(
            set(2, Some(POLICIES[2])),
            vec![claim(0, vec![]), claim_terminating(claim(1, stale.clone()))],
            vec![pod(0), pending],
        );
        let p = w.plan(&opts(true));
        assert_eq!(
            writes(&p),
            vec![&Action::DeletePod {
                pod: "web-1".into(),
                uid: "uid-new".into()
            }]
        );
        assert_eq!(reasons(&p), vec!["PodHeldForTerminatingClaim"]);
        // Already running there: the stale ref proves why it is terminating, so it goes too.
        let w = world(
            set(2, Some(POLICIES[2])),
            vec![claim_terminating(claim(1, stale))],
            vec![pod_with_uid(1, "uid-new")],
        );
        assert_eq!(writes(&w.plan(&opts(true))).len(), 1);
        // A running pod on a claim someone deleted by hand is only reported.
        let w = world(
            set(2, Some(POLICIES[2])),
            vec![claim_terminating(claim(1, vec![]))],
            vec![pod(1)],
        );
        let p = w.plan(&opts(true));
        assert!(writes(&p).is_empty());
        assert_eq!(reasons(&p), vec!["PodOnTerminatingClaim"]);
    }

    fn node_loss_world(annotation: Option<&str>) -> World {
        let mut s = set(2, Some(POLICIES[0]));
        if let Some(v) = annotation {
            s = annotate(s, ON_NODE_LOSS_ANNOTATION, v);
        }
        let mut w = world(
            s,
            vec![claim(0, vec![]), claim(1, vec![])],
            vec![pod(0), unschedulable(pod(1), ts(-600))],
        );
        w.volumes = vec![pv(0, "node-a", "m-a"), pv(1, "node-b", "m-b")];
        w.nodes = vec![node("node-a", "m-a", true)];
        w
    }

    fn recreated(p: &Plan) -> bool {
        writes(p)
            == vec![
                &Action::DeleteClaim {
                    claim: "data-web-1".into(),
                    uid: claim_uid(1),
                    resource_version: "101".into(),
                },
                &Action::DeletePod {
                    pod: "web-1".into(),
                    uid: pod_uid(1),
                },
            ]
    }

    #[test]
    fn node_deleted_recreates_the_claim_after_grace() {
        let mut w = node_loss_world(Some("recreate"));
        w.gone = vec!["node-b"];
        let p = w.plan(&opts(false));
        assert!(recreated(&p), "{p:?}");
        assert_eq!(
            reasons(&p),
            vec!["ClaimRecreatedAfterNodeLoss", "PodRecreatedAfterNodeLoss"]
        );
        // Inside the grace period: wait, report, and come back when it ends.
        w.pods[1] = unschedulable(pod(1), ts(-60));
        let p = w.plan(&opts(false));
        assert!(writes(&p).is_empty());
        assert_eq!(reasons(&p), vec!["NodeLost"]);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(240)));
    }

    #[test]
    fn node_loss_waits_by_default() {
        for annotation in [None, Some("wait"), Some("yes")] {
            let mut w = node_loss_world(annotation);
            w.gone = vec!["node-b"];
            let p = w.plan(&opts(false));
            assert!(writes(&p).is_empty(), "{annotation:?}");
            assert_eq!(reasons(&p), vec!["NodeLost"]);
        }
    }

    /// The events' messages, by reason.
    fn messages(plan: &Plan, reason: &str) -> Vec<String> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(n) if n.reason == reason => Some(n.message.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ready_node_is_never_lost_whatever_else_is_true() {
        // The data-loss report: node Ready but cordoned, pod unschedulable far past the grace
        // period, and the volume's recorded machine ID different from the node's.
        // (case, node, machine ID recorded with the volume, whether the change is reported)
        let cases = [
            (
                "cordoned, same machine",
                cordoned(node("node-b", "m-b", true)),
                "m-b",
                false,
            ),
            (
                "cordoned, other machine",
                cordoned(node("node-b", "m-new", true)),
                "m-b",
                true,
            ),
            (
                "driver recorded 'unknown'",
                node("node-b", "m-b", true),
                "unknown",
                false,
            ),
            (
                "node reports no machine ID",
                node("node-b", "", true),
                "m-b",
                false,
            ),
            (
                "readiness unknown, no time",
                node("node-b", "m-b", false),
                "m-b",
                false,
            ),
        ];
        for (case, n, recorded, reported) in cases {
            let mut w = node_loss_world(Some("recreate"));
            w.nodes.push(n);
            w.volumes[1] = pv(1, "node-b", recorded);
            // Even an old CSINode read saying the driver is gone changes nothing.
            w.csinodes = vec![("node-b", None)];
            let p = w.plan(&opts(false));
            assert!(writes(&p).is_empty(), "{case}: {p:?}");
            assert!(p.unconfirmed_nodes.is_empty() && p.unconfirmed_drivers.is_empty());
            let expected: Vec<&str> = if reported {
                vec!["NodeIdentityChanged"]
            } else {
                vec![]
            };
            assert_eq!(reasons(&p), expected, "{case}");
        }
    }

    #[test]
    fn unknown_identity_on_either_side_is_cannot_tell() {
        let mut w = node_loss_world(Some("recreate"));
        w.nodes.push(node("node-b", "m-now", true));
        for recorded in ["unknown", "", " "] {
            w.volumes[1] = pv(1, "node-b", recorded);
            assert_eq!(w.plan(&opts(false)), Plan::default(), "{recorded:?}");
        }
        w.volumes[1] = pv(1, "node-b", "m-b");
        for current in ["unknown", ""] {
            w.nodes[1] = node("node-b", current, true);
            assert_eq!(w.plan(&opts(false)), Plan::default(), "{current:?}");
        }
    }

    #[test]
    fn not_ready_node_is_lost_only_past_grace_with_its_driver_gone() {
        let mut w = node_loss_world(Some("recreate"));
        // NotReady for a minute: wait, and look again when the grace period ends.
        w.nodes
            .push(not_ready_since(node("node-b", "m-b", false), ts(-60)));
        let p = w.plan(&opts(false));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.requeue_after, Some(Duration::from_secs(240)));
        // NotReady past the grace period: the CSINode must be read before anything happens.
        w.nodes[1] = not_ready_since(node("node-b", "m-b", false), ts(-600));
        let p = w.plan(&opts(false));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.unconfirmed_drivers, vec!["node-b".to_string()]);
        // Kennel's driver still registered: the node may come back with its disk.
        w.csinodes = vec![("node-b", Some(csinode("node-b", &[DRIVER])))];
        assert_eq!(w.plan(&opts(false)), Plan::default());
        // Driver gone from the CSINode (or the CSINode gone): lost.
        for gone in [Some(csinode("node-b", &["other.csi"])), None] {
            w.csinodes = vec![("node-b", gone)];
            let p = w.plan(&opts(false));
            assert!(recreated(&p), "{p:?}");
            let m = messages(&p, "ClaimRecreatedAfterNodeLoss");
            assert!(
                m[0].contains("NotReady since") && m[0].contains("CSINode"),
                "{m:?}"
            );
        }
    }

    #[test]
    fn deletions_are_announced_before_they_happen() {
        let mut w = node_loss_world(Some("recreate"));
        w.gone = vec!["node-b"];
        let p = w.plan(&opts(false));
        let position = |pred: &dyn Fn(&Action) -> bool| {
            p.actions.iter().position(pred).expect("action present")
        };
        let claim_event = position(&|a| {
            matches!(a, Action::Event(n) if n.reason == "ClaimRecreatedAfterNodeLoss"
                && n.regarding == Regarding::Claim("data-web-1".into())
                && n.message.contains("data-web-1"))
        });
        let claim_delete = position(&|a| matches!(a, Action::DeleteClaim { .. }));
        let pod_event = position(&|a| {
            matches!(a, Action::Event(n) if n.reason == "PodRecreatedAfterNodeLoss"
                && n.regarding == Regarding::Pod("web-1".into()))
        });
        let pod_delete = position(&|a| matches!(a, Action::DeletePod { .. }));
        assert!(
            claim_event < claim_delete && pod_event < pod_delete,
            "{p:?}"
        );
    }

    #[test]
    fn node_lost_message_is_the_same_on_every_pass() {
        let mut w = node_loss_world(Some("recreate"));
        w.gone = vec!["node-b"];
        w.pods[1] = unschedulable(pod(1), ts(-60));
        let first = messages(&w.plan(&opts(false)), "NodeLost");
        let mut later = opts(false);
        later.now = ts(30);
        let second = messages(&w.plan(&later), "NodeLost");
        assert_eq!(first.len(), 1);
        assert_eq!(first, second);
        assert!(first[0].contains(&ts(240).to_string()), "{first:?}");
    }

    #[test]
    fn node_missing_only_from_cache_asks_for_confirmation() {
        let w = node_loss_world(Some("recreate"));
        let p = w.plan(&opts(false));
        assert!(p.actions.is_empty());
        assert_eq!(p.unconfirmed_nodes, vec!["node-b".to_string()]);
    }

    #[test]
    fn scheduled_or_foreign_driver_pods_are_not_node_loss() {
        let mut w = node_loss_world(Some("recreate"));
        w.gone = vec!["node-b"];
        w.volumes[1]
            .spec
            .as_mut()
            .unwrap()
            .csi
            .as_mut()
            .unwrap()
            .driver = "other.csi".into();
        assert_eq!(w.plan(&opts(false)), Plan::default());
        let mut w = node_loss_world(Some("recreate"));
        w.gone = vec!["node-b"];
        w.pods[1] = pod(1);
        assert_eq!(w.plan(&opts(false)), Plan::default());
    }

    #[test]
    fn released_volume_on_a_deleted_node_is_cleaned() {
        let mut w = node_loss_world(None);
        w.pods.truncate(1);
        w.claims.truncate(1);
        w.volumes[1] = released(pv(1, "node-b", "m-b"));
        let p = w.plan(&opts(false));
        assert_eq!(p.unconfirmed_nodes, vec!["node-b".to_string()]);
        assert!(p.actions.is_empty());
        w.gone = vec!["node-b"];
        let p = w.plan(&opts(false));
        assert_eq!(
            writes(&p),
            vec![
                &Action::SetVolumeFinalizers {
                    volume: "pv-1".into(),
                    resource_version: "301".into(),
                    finalizers: vec!["kubernetes.io/pv-protection".into()],
                },
                &Action::DeleteVolume {
                    volume: "pv-1".into(),
                    uid: "uid-pv-1".into()
                },
            ]
        );
        // Retain reclaim policy: left for the administrator.
        w.volumes[1]
            .spec
            .as_mut()
            .unwrap()
            .persistent_volume_reclaim_policy = Some("Retain".into());
        assert!(w.plan(&opts(false)).actions.is_empty());
    }
}
