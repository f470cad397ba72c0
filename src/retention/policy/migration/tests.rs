//! The migration planner against a small model of the API server and of the controllers that
//! answer its writes (snapshot-controller, csi-provisioner, the PV controller, the StatefulSet
//! controller), pass by pass.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

use super::super::{plan, Action, Observed, Options, Plan, SnapshotState};
use crate::retention::fixtures::*;
use crate::retention::migration_record::*;
use crate::retention::nodeloss::NodeView;
use crate::topology::TOPOLOGY_KEY;

const CLAIM: &str = "data-web-0";

fn opts() -> Options {
    Options {
        builtin: true,
        sweep_orphaned_claims: false,
        node_loss_grace: std::time::Duration::from_secs(300),
        driver_name: DRIVER.into(),
        snapshot_class: "kennel".into(),
        now: ts(0),
    }
}

fn registered(mut node: Node) -> Node {
    let name = node.metadata.name.clone().unwrap_or_default();
    node.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(TOPOLOGY_KEY.into(), name);
    node
}

/// What the cluster holds, changed only by `apply` (the planner's writes) and by the
/// methods that play the other controllers.
struct Cluster {
    set: StatefulSet,
    claims: Vec<PersistentVolumeClaim>,
    pods: Vec<Pod>,
    volumes: Vec<PersistentVolume>,
    nodes: Vec<Node>,
    snapshots: Vec<SnapshotState>,
    reached: Vec<&'static str>,
    reasons: Vec<&'static str>,
    next_uid: u32,
}

impl Cluster {
    /// Set `web` (annotated `on-drain` = `on_drain`) whose pod 0 was evicted from cordoned
    /// node-a and waits, unschedulable; its claim's volume is on node-a; node-b takes volumes.
    fn drained(on_drain: Option<&str>) -> Cluster {
        let mut set = set(1, None);
        if let Some(v) = on_drain {
            set = annotate(set, ON_DRAIN_ANNOTATION, v);
        }
        let mut pv = pv(0, "node-a", "m-a");
        pv.spec.as_mut().unwrap().capacity =
            Some([("storage".to_owned(), Quantity("64Mi".into()))].into());
        let mut claim = claim(0, vec![]);
        claim.spec.as_mut().unwrap().storage_class_name = Some("kennel-loop".into());
        Cluster {
            set,
            claims: vec![claim],
            pods: vec![unschedulable(pod_with_uid(0, "pod-1"), ts(-30))],
            volumes: vec![pv],
            nodes: vec![
                registered(cordoned(node("node-a", "m-a", true))),
                registered(node("node-b", "m-b", true)),
            ],
            snapshots: vec![],
            reached: vec![],
            reasons: vec![],
            next_uid: 0,
        }
    }

    fn plan(&self) -> Plan {
        let claims: Vec<&PersistentVolumeClaim> = self.claims.iter().collect();
        let pods: Vec<&Pod> = self.pods.iter().collect();
        let volumes: Vec<&PersistentVolume> = self.volumes.iter().collect();
        let nodes = NodeView::from_nodes(&self.nodes);
        plan(
            Observed {
                set: &self.set,
                claims: &claims,
                pods: &pods,
                volumes: &volumes,
                nodes: &nodes,
                snapshots: &self.snapshots,
            },
            &opts(),
        )
    }

    fn uid(&mut self, kind: &str) -> String {
        self.next_uid += 1;
        format!("uid-{kind}-{}", self.next_uid)
    }

    fn volume(&mut self, name: &str) -> &mut PersistentVolume {
        self.volumes
            .iter_mut()
            .find(|v| v.metadata.name.as_deref() == Some(name))
            .expect("volume exists")
    }

    fn claim(&self, name: &str) -> Option<&PersistentVolumeClaim> {
        self.claims
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
    }

    /// One pass: plan, then carry out its writes as the API server would.
    fn pass(&mut self) -> Plan {
        let plan = self.plan();
        for action in &plan.actions {
            match action {
                Action::Event(note) => self.reasons.push(note.reason),
                Action::Reached(point) => self.reached.push(point),
                Action::PatchVolume {
                    volume,
                    resource_version,
                    patch,
                } => {
                    let pv = self.volume(volume);
                    assert_eq!(
                        pv.metadata.resource_version.as_ref(),
                        Some(resource_version)
                    );
                    let mut value = serde_json::to_value(&*pv).unwrap();
                    merge(&mut value, patch);
                    *pv = serde_json::from_value(value).unwrap();
                    let next = resource_version.parse::<u64>().unwrap() + 1;
                    pv.metadata.resource_version = Some(next.to_string());
                }
                Action::CreateSnapshot { name, claim, .. } => {
                    assert!(self.claim(claim).is_some(), "snapshot of a missing claim");
                    self.snapshots.push(SnapshotState {
                        name: name.clone(),
                        ready: false,
                        deleting: false,
                        error: None,
                    });
                }
                Action::DeleteSnapshot { name } => self.snapshots.retain(|s| &s.name != name),
                Action::CreateClaim { claim } => {
                    let mut claim = (**claim).clone();
                    claim.metadata.uid = Some(self.uid("claim"));
                    claim.metadata.resource_version = Some("1".into());
                    self.claims.push(claim);
                }
                Action::DeleteClaim { claim, uid, .. } => self.claims.retain(|c| {
                    c.metadata.name.as_ref() != Some(claim) || c.metadata.uid.as_ref() != Some(uid)
                }),
                Action::ReplaceClaims {
                    pod,
                    pod_uid,
                    claims,
                } => {
                    let p = self
                        .pods
                        .iter()
                        .find(|p| p.metadata.name.as_ref() == Some(pod))
                        .expect("pod");
                    assert_eq!(p.metadata.uid.as_ref(), Some(pod_uid));
                    for (name, uid) in claims {
                        self.claims.retain(|c| {
                            c.metadata.name.as_ref() != Some(name)
                                || c.metadata.uid.as_ref() != Some(uid)
                        });
                    }
                    self.pods.retain(|p| p.metadata.name.as_ref() != Some(pod));
                }
                Action::ConfirmClaim {
                    claim,
                    uid,
                    in_place,
                } => {
                    let there = self.claim(claim).is_some_and(|c| {
                        c.metadata.uid.as_ref() == Some(uid)
                            && c.metadata.deletion_timestamp.is_none()
                    });
                    if there != *in_place {
                        break; // the controller stops the plan and plans again
                    }
                }
                Action::DeletePod { pod, .. } => {
                    self.pods.retain(|p| p.metadata.name.as_ref() != Some(pod))
                }
                other => panic!("unexpected action {other:?}"),
            }
        }
        plan
    }

    fn staging(&self) -> String {
        staging_name("uid-pv-0")
    }

    /// snapshot-controller: the snapshot is taken.
    fn snapshot_ready(&mut self) {
        for s in &mut self.snapshots {
            s.ready = true;
        }
    }

    /// csi-provisioner on node-b: the staging claim is restored into PV `pv-copy`.
    fn provision_copy(&mut self) {
        let staging = self.staging();
        let claim_uid = self.claim(&staging).unwrap().metadata.uid.clone();
        let mut copy = pv(0, "node-b", "m-b");
        copy.metadata.name = Some("pv-copy".into());
        copy.metadata.uid = Some("uid-pv-copy".into());
        let r = copy.spec.as_mut().unwrap().claim_ref.as_mut().unwrap();
        r.name = Some(staging.clone());
        r.uid = claim_uid;
        self.volumes.push(copy);
        let c = self
            .claims
            .iter_mut()
            .find(|c| c.metadata.name.as_deref() == Some(staging.as_str()))
            .unwrap();
        c.spec.as_mut().unwrap().volume_name = Some("pv-copy".into());
    }

    /// The StatefulSet controller makes pod 0 and its claim again; the PV controller binds
    /// the claim to the PV reserved for its name.
    fn recreate(&mut self) {
        let mut claim = claim(0, vec![]);
        claim.metadata.uid = Some(self.uid("claim"));
        let reserved = self
            .volumes
            .iter()
            .find(|v| {
                let r = v.spec.as_ref().unwrap().claim_ref.as_ref().unwrap();
                r.name.as_deref() == Some(CLAIM) && r.uid.is_none()
            })
            .and_then(|v| v.metadata.name.clone())
            .expect("a PV reserved for the claim");
        claim.spec.as_mut().unwrap().volume_name = Some(reserved.clone());
        let uid = claim.metadata.uid.clone();
        self.volume(&reserved)
            .spec
            .as_mut()
            .unwrap()
            .claim_ref
            .as_mut()
            .unwrap()
            .uid = uid;
        self.claims.push(claim);
        self.pods
            .push(unschedulable(pod_with_uid(0, "pod-2"), ts(0)));
    }

    /// The scheduler and the kubelet: pod 0 runs, Ready, on `node`.
    fn ready_on(&mut self, node: &str) {
        let ready = serde_json::json!({
            "spec": {"nodeName": node},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let pod = &mut self.pods[0];
        let mut value = serde_json::to_value(&*pod).unwrap();
        merge(&mut value, &ready);
        *pod = serde_json::from_value(value).unwrap();
    }

    fn policy(&self, pv: &str) -> String {
        self.volumes
            .iter()
            .find(|v| v.metadata.name.as_deref() == Some(pv))
            .and_then(|v| v.spec.as_ref()?.persistent_volume_reclaim_policy.clone())
            .unwrap_or_default()
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key).or_insert(Value::Null), value);
        }
    }
}

/// Walks a migration to the snapshot, staged copy and reservation: returns the world at the
/// point where the next pass replaces the claim.
fn walk_to_prebound(world: &mut Cluster) {
    world.pass();
    assert_eq!(
        world.policy("pv-0"),
        "Retain",
        "the old volume is kept first"
    );
    world.pass();
    world.pass(); // the snapshot is not ready: nothing more
    world.snapshot_ready();
    world.pass();
    assert!(world.claim(&world.staging()).is_some(), "a staging claim");
    world.pass(); // being restored: nothing more
    world.provision_copy();
    world.pass();
    assert_eq!(world.policy("pv-copy"), "Retain", "the copy is kept");
    world.pass();
    assert!(world.claim(&world.staging()).is_none(), "staging released");
    world.pass();
}

#[test]
fn a_drained_claim_moves_step_by_step_and_the_old_volume_goes_last() {
    let mut world = Cluster::drained(Some("migrate"));
    walk_to_prebound(&mut world);
    world.pass();
    assert!(
        world.claim(CLAIM).is_none() && world.pods.is_empty(),
        "replaced"
    );
    world.pass(); // the StatefulSet has not made them again yet: nothing
    world.recreate();
    world.pass(); // the pod is not Ready yet: nothing is deleted
    assert_eq!(world.snapshots.len(), 1);
    assert_eq!(world.policy("pv-0"), "Retain");
    world.ready_on("node-b");
    for _ in 0..4 {
        world.pass();
    }
    assert_eq!(world.reached, STEPS, "every step, in order");
    assert!(world.snapshots.is_empty());
    assert_eq!(world.policy("pv-copy"), "Delete", "the old volume's policy");
    assert_eq!(
        world.policy("pv-0"),
        "Delete",
        "released to its provisioner"
    );
    let copy = world
        .volumes
        .iter()
        .find(|v| v.metadata.name.as_deref() == Some("pv-copy"));
    assert!(copy_of(copy.unwrap()).is_none(), "the copy record is gone");
    for reason in [
        "MigrationStarted",
        "MigrationSnapshot",
        "MigrationCopying",
        "ClaimMoved",
        "PodMoved",
        "MigrationComplete",
    ] {
        assert!(
            world.reasons.contains(&reason),
            "{reason} in {:?}",
            world.reasons
        );
    }
    assert!(!world.pass().has_writes(), "nothing more to do");
}

#[test]
fn the_staging_claim_asks_for_the_target_node_and_the_snapshot() {
    let mut world = Cluster::drained(Some("migrate"));
    world.pass();
    world.pass();
    world.snapshot_ready();
    world.pass();
    let staging = world
        .claim(&world.staging())
        .expect("staging claim")
        .clone();
    let notes = staging.metadata.annotations.unwrap();
    assert_eq!(notes[SELECTED_NODE_ANNOTATION], "node-b");
    let spec = staging.spec.unwrap();
    let source = spec.data_source.unwrap();
    assert_eq!(
        (source.kind.as_str(), source.name),
        ("VolumeSnapshot", world.staging())
    );
    assert_eq!(spec.storage_class_name.as_deref(), Some("kennel-loop"));
    assert_eq!(
        spec.resources.unwrap().requests.unwrap()["storage"].0,
        "64Mi"
    );
    let record = migration_of(&world.volumes[0]).expect("recorded");
    assert_eq!(
        (record.from.as_str(), record.to.as_str()),
        ("node-a", "node-b")
    );
    assert_eq!(record.reclaim_policy, "Delete");
    assert_eq!(record.pod_uid, "pod-1");
}

#[test]
fn a_pod_scheduled_again_before_the_claim_is_replaced_undoes_everything() {
    let mut world = Cluster::drained(Some("migrate"));
    walk_to_prebound(&mut world);
    // Node-a is uncordoned and the pod runs there again, on the old volume.
    world.nodes[0] = registered(node("node-a", "m-a", true));
    world.ready_on("node-a");
    for _ in 0..6 {
        world.pass();
        // The PV controller deletes a Released copy whose policy is Delete.
        world.volumes.retain(|v| {
            v.metadata.name.as_deref() != Some("pv-copy")
                || v.spec
                    .as_ref()
                    .unwrap()
                    .persistent_volume_reclaim_policy
                    .as_deref()
                    != Some("Delete")
        });
    }
    assert!(world.claim(CLAIM).is_some(), "the claim is kept");
    assert!(world.snapshots.is_empty(), "the snapshot is deleted");
    assert!(
        world
            .volumes
            .iter()
            .all(|v| v.metadata.name.as_deref() != Some("pv-copy")),
        "the copy is deleted"
    );
    assert_eq!(world.policy("pv-0"), "Delete", "the old policy is back");
    assert!(
        migration_of(&world.volumes[0]).is_none(),
        "the record is gone"
    );
    assert!(world.reasons.contains(&"MigrationUndone"));
    assert!(!world.pass().has_writes(), "nothing more to do");
}

#[test]
fn a_replaced_pod_undoes_a_migration_before_its_copy() {
    let mut world = Cluster::drained(Some("migrate"));
    world.pass();
    world.pass();
    // Another pod of the ordinal: it may have run on node-a meanwhile.
    world.pods = vec![unschedulable(pod_with_uid(0, "pod-other"), ts(0))];
    world.pass();
    world.pass();
    assert!(world.snapshots.is_empty());
    assert!(migration_of(&world.volumes[0]).is_none());
    assert_eq!(world.policy("pv-0"), "Delete");
    // The new pod is still on a drained node: a new migration starts for it.
    world.pass();
    assert_eq!(
        migration_of(&world.volumes[0]).unwrap().pod_uid,
        "pod-other"
    );
}

#[test]
fn without_the_annotation_or_a_cordon_nothing_moves() {
    for world in [Cluster::drained(None), Cluster::drained(Some("wait")), {
        let mut w = Cluster::drained(Some("migrate"));
        w.nodes[0] = registered(node("node-a", "m-a", true));
        w
    }] {
        let plan = world.plan();
        assert!(!plan.has_writes(), "{:?}", plan.actions);
    }
}

#[test]
fn with_no_node_to_move_to_it_waits_and_says_so() {
    for target in [
        node("node-b", "m-b", true),                       // no Kennel driver
        registered(cordoned(node("node-b", "m-b", true))), // cordoned too
        registered(node("node-b", "m-b", false)),          // not Ready
    ] {
        let mut world = Cluster::drained(Some("migrate"));
        world.nodes[1] = target;
        let plan = world.pass();
        assert!(!plan.has_writes(), "{:?}", plan.actions);
        assert_eq!(world.reasons, ["MigrationWaiting"]);
        assert!(plan.requeue_after.is_some());
    }
}

#[test]
fn a_node_the_pod_refuses_is_no_target() {
    let mut world = Cluster::drained(Some("migrate"));
    world.pods[0]
        .spec
        .get_or_insert_with(Default::default)
        .node_selector = Some([("disk".to_owned(), "ssd".to_owned())].into());
    let plan = world.pass();
    assert!(!plan.has_writes(), "{:?}", plan.actions);
    assert_eq!(world.reasons, ["MigrationWaiting"]);
    world.nodes[1]
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("disk".into(), "ssd".into());
    world.pass();
    assert_eq!(migration_of(&world.volumes[0]).unwrap().to, "node-b");
}

#[test]
fn a_replaced_claim_still_in_the_cache_never_undoes() {
    let mut world = Cluster::drained(Some("migrate"));
    walk_to_prebound(&mut world);
    world.pass();
    // The claim's deletion has not reached this cache, but the new pod already has: an undo
    // here would release the copy the new claim is about to bind.
    let mut stale = claim(0, vec![]);
    stale.spec.as_mut().unwrap().storage_class_name = Some("kennel-loop".into());
    world.claims.push(stale);
    world.pods = vec![unschedulable(pod_with_uid(0, "pod-2"), ts(0))];
    let plan = world.plan();
    assert!(
        matches!(plan.actions.first(), Some(Action::ConfirmClaim { .. })),
        "an undo must confirm the claim first: {:?}",
        plan.actions
    );
    // The API server says the claim is going: nothing of the undo is carried out.
    world.claims[0].metadata.deletion_timestamp = world.pods[0].metadata.creation_timestamp.clone();
    world.pass();
    assert_eq!(world.policy("pv-copy"), "Retain", "the copy is kept");
    assert!(
        migration_of(&world.volumes[0]).is_some(),
        "the record stays"
    );
    // Seen being deleted, the claim counts as replaced: the migration goes on.
    let plan = world.plan();
    assert!(
        plan.actions
            .iter()
            .all(|a| !matches!(a, Action::ConfirmClaim { .. })),
        "{:?}",
        plan.actions
    );
}

#[test]
fn an_interrupted_replacement_deletes_the_left_pod() {
    let mut world = Cluster::drained(Some("migrate"));
    walk_to_prebound(&mut world);
    // The claim was deleted but the controller died before the pod.
    world
        .claims
        .retain(|c| c.metadata.name.as_deref() != Some(CLAIM));
    let plan = world.pass();
    let confirm = plan.actions.iter().position(
        |a| matches!(a, Action::ConfirmClaim { in_place: false, uid, .. } if *uid == claim_uid(0)),
    );
    let delete = plan
        .actions
        .iter()
        .position(|a| matches!(a, Action::DeletePod { uid, .. } if uid == "pod-1"));
    assert!(
        matches!((confirm, delete), (Some(c), Some(d)) if c < d),
        "the claim's absence is confirmed uncached before the pod goes: {:?}",
        plan.actions
    );
    assert!(world.pods.is_empty(), "the pod is deleted");
}
