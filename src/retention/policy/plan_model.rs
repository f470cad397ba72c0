//! What the planner reads (a set and the objects around it, options) and what it returns (a
//! plan of writes and events), and the retention policy a set asks for.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;

use crate::retention::nodeloss::NodeView;

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
    pub(super) fn parse(value: Option<&str>) -> Self {
        match value {
            Some("Delete") => PolicyType::Delete,
            _ => PolicyType::Retain,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
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

    pub(super) fn retains_all(&self) -> bool {
        self.when_deleted == PolicyType::Retain && self.when_scaled == PolicyType::Retain
    }

    pub(super) fn describe(&self) -> String {
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
    /// VolumeSnapshotClass of the snapshots migrate-on-drain takes.
    pub snapshot_class: String,
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
    /// The migrations' VolumeSnapshots in the set's namespace, read when the plan asks.
    pub snapshots: &'a [SnapshotState],
}

/// What a migration needs to know of one of its VolumeSnapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotState {
    pub name: String,
    pub ready: bool,
    pub deleting: bool,
    /// status.error.message, if the snapshot failed.
    pub error: Option<String>,
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
    /// Set (`Some`) or remove (`None`) one annotation of the claim, if its resourceVersion is
    /// still `resource_version`.
    SetClaimAnnotation {
        claim: String,
        resource_version: String,
        key: &'static str,
        value: Option<String>,
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
    /// JSON merge patch of a PV, if its resourceVersion is still `resource_version`.
    PatchVolume {
        volume: String,
        resource_version: String,
        patch: serde_json::Value,
    },
    /// A VolumeSnapshot `name` of `claim`, labelled with the migration it belongs to.
    CreateSnapshot {
        name: String,
        claim: String,
        class: String,
        migration: String,
    },
    DeleteSnapshot {
        name: String,
    },
    CreateClaim {
        claim: Box<PersistentVolumeClaim>,
    },
    /// Deletes the claims (UID preconditions) and then their pod, only if an uncached read
    /// shows the pod still the one with `pod_uid`, Pending and unscheduled: a pod that may
    /// have written to the old volume since it was copied keeps it.
    ReplaceClaims {
        pod: String,
        pod_uid: String,
        claims: Vec<(String, String)>,
    },
    /// Stops the plan here (a conflict: plan again) unless an uncached read shows `claim` with
    /// `uid` and not being deleted (`in_place`), or shows it gone (not `in_place`): what
    /// follows is safe only then.
    ConfirmClaim {
        claim: String,
        uid: String,
        in_place: bool,
    },
    /// A step of a multi-step operation is done: a named point where tests stop the
    /// controller (src/faults.rs).
    Reached(&'static str),
    Event(Note),
}

impl Action {
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Action::Event(_) | Action::Reached(_) | Action::ConfirmClaim { .. }
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Plan again after this long even if nothing changes (a grace period is running).
    pub requeue_after: Option<Duration>,
    /// Nodes the cache shows missing or out of service: an uncached GET must confirm it
    /// before anything is decided about their volumes.
    pub unconfirmed_nodes: Vec<String>,
    /// A migration is under way: plan again with its VolumeSnapshots read.
    pub needs_snapshots: bool,
}

impl Plan {
    pub fn has_writes(&self) -> bool {
        self.actions.iter().any(Action::is_write)
    }

    pub(super) fn event(
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

    pub(super) fn requeue(&mut self, after: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(after, |d| d.min(after)));
    }

    pub(super) fn unconfirmed(&mut self, node: String) {
        if !self.unconfirmed_nodes.contains(&node) {
            self.unconfirmed_nodes.push(node);
        }
    }
}
