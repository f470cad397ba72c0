//! Test objects: one StatefulSet `web` in `default` with one claim template `data`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetOrdinals, StatefulSetPersistentVolumeClaimRetentionPolicy,
    StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Node, NodeCondition, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, NodeSpec, NodeStatus, NodeSystemInfo, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeSpec, PersistentVolumeStatus,
    Pod, PodCondition, PodSpec, PodStatus, Taint, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;

use super::nodeloss::MACHINE_ID_ATTRIBUTE;
use crate::topology::TOPOLOGY_KEY;

pub const NS: &str = "default";
pub const SET: &str = "web";
pub const SET_UID: &str = "uid-set";
pub const DRIVER: &str = "kennel.csi.dev";

pub fn ts(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + seconds).expect("valid timestamp")
}

pub fn set(replicas: i32, policy: Option<(&str, &str)>) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            name: Some(SET.into()),
            namespace: Some(NS.into()),
            uid: Some(SET_UID.into()),
            resource_version: Some("10".into()),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            persistent_volume_claim_retention_policy: policy.map(|(d, s)| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(d.into()),
                    when_scaled: Some(s.into()),
                }
            }),
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    ..Default::default()
                },
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn annotate(mut set: StatefulSet, key: &str, value: &str) -> StatefulSet {
    set.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.into(), value.into());
    set
}

pub fn start_at(mut set: StatefulSet, start: i32) -> StatefulSet {
    if let Some(spec) = set.spec.as_mut() {
        spec.ordinals = Some(StatefulSetOrdinals { start: Some(start) });
    }
    set
}

pub fn deleting(mut set: StatefulSet, finalizer: Option<&str>) -> StatefulSet {
    set.metadata.deletion_timestamp = Some(Time(ts(0)));
    set.metadata.finalizers = finalizer.map(|f| vec![f.to_string()]);
    set
}

pub fn pod_uid(ordinal: u32) -> String {
    format!("uid-pod-{ordinal}")
}

/// A running pod of the set.
pub fn pod(ordinal: u32) -> Pod {
    pod_with_uid(ordinal, &pod_uid(ordinal))
}

pub fn pod_with_uid(ordinal: u32, uid: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{SET}-{ordinal}")),
            namespace: Some(NS.into()),
            uid: Some(uid.into()),
            resource_version: Some("20".into()),
            creation_timestamp: Some(Time(ts(-7200))),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: SET.into(),
                uid: SET_UID.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

pub fn terminating(mut pod: Pod) -> Pod {
    pod.metadata.deletion_timestamp = Some(Time(ts(-5)));
    pod
}

/// A pod the scheduler could not place since `since`.
pub fn unschedulable(mut pod: Pod, since: Timestamp) -> Pod {
    pod.spec = Some(PodSpec::default());
    pod.status = Some(PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            last_transition_time: Some(Time(since)),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

pub fn claim_uid(ordinal: u32) -> String {
    format!("uid-claim-{ordinal}")
}

pub fn claim(ordinal: u32, refs: Vec<OwnerReference>) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(format!("data-{SET}-{ordinal}")),
            namespace: Some(NS.into()),
            uid: Some(claim_uid(ordinal)),
            resource_version: Some(format!("{}", 100 + ordinal)),
            owner_references: (!refs.is_empty()).then_some(refs),
            finalizers: Some(vec!["kubernetes.io/pvc-protection".into()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: Some(format!("pv-{ordinal}")),
            ..Default::default()
        }),
        status: None,
    }
}

pub fn claim_terminating(mut claim: PersistentVolumeClaim) -> PersistentVolumeClaim {
    claim.metadata.deletion_timestamp = Some(Time(ts(-1)));
    claim
}

pub fn set_ref() -> OwnerReference {
    set_ref_uid(SET_UID)
}

pub fn set_ref_uid(uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "StatefulSet".into(),
        name: SET.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub fn pod_ref(ordinal: u32) -> OwnerReference {
    pod_ref_uid(ordinal, &pod_uid(ordinal))
}

pub fn pod_ref_uid(ordinal: u32, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: format!("{SET}-{ordinal}"),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The pre-1.31 shape: an owner, but not a controller.
pub fn plain(mut r: OwnerReference) -> OwnerReference {
    r.controller = None;
    r.block_owner_deletion = None;
    r
}

pub fn foreign_ref(controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: "example.com/v1".into(),
        kind: "Database".into(),
        name: "db".into(),
        uid: "uid-db".into(),
        controller: Some(controller),
        block_owner_deletion: None,
    }
}

/// The Kennel PV of claim `ordinal`, pinned to `node`, made on machine `machine`.
pub fn pv(ordinal: u32, node: &str, machine: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(format!("pv-{ordinal}")),
            uid: Some(format!("uid-pv-{ordinal}")),
            resource_version: Some(format!("{}", 300 + ordinal)),
            finalizers: Some(vec![
                "kubernetes.io/pv-protection".into(),
                "external-provisioner.volume.kubernetes.io/finalizer".into(),
            ]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            claim_ref: Some(ObjectReference {
                namespace: Some(NS.into()),
                name: Some(format!("data-{SET}-{ordinal}")),
                uid: Some(claim_uid(ordinal)),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER.into(),
                volume_handle: format!("vol-{ordinal}"),
                volume_attributes: Some(BTreeMap::from([(
                    MACHINE_ID_ATTRIBUTE.to_string(),
                    machine.to_string(),
                )])),
                ..Default::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: TOPOLOGY_KEY.into(),
                            operator: "In".into(),
                            values: Some(vec![node.into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            persistent_volume_reclaim_policy: Some("Delete".into()),
            ..Default::default()
        }),
        status: Some(PersistentVolumeStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        }),
    }
}

pub fn released(mut pv: PersistentVolume) -> PersistentVolume {
    pv.status = Some(PersistentVolumeStatus {
        phase: Some("Released".into()),
        ..Default::default()
    });
    pv
}

pub fn node(name: &str, machine: &str, ready: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-node-{name}")),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "Unknown" }.into(),
                ..Default::default()
            }]),
            node_info: Some(NodeSystemInfo {
                machine_id: machine.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// `node` with its Ready condition False since `since`.
pub fn not_ready_since(mut node: Node, since: Timestamp) -> Node {
    let status = node.status.get_or_insert_with(Default::default);
    status.conditions = Some(vec![NodeCondition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: Some("KubeletNotReady".into()),
        last_transition_time: Some(Time(since)),
        ..Default::default()
    }]);
    node
}

/// `node` tainted out of service (Kubernetes' non-graceful node shutdown).
pub fn out_of_service(mut node: Node) -> Node {
    node.spec
        .get_or_insert_with(Default::default)
        .taints
        .get_or_insert_with(Vec::new)
        .push(Taint {
            key: crate::retention::nodeloss::OUT_OF_SERVICE_TAINT.into(),
            value: Some("nodeshutdown".into()),
            effect: "NoExecute".into(),
            ..Default::default()
        });
    node
}

/// `node` cordoned (`kubectl cordon`).
pub fn cordoned(mut node: Node) -> Node {
    node.spec = Some(NodeSpec {
        unschedulable: Some(true),
        ..Default::default()
    });
    node
}
