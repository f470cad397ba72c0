use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::*;
use crate::retention::fixtures::*;
use crate::retention::nodeloss::{NodeView, NODE_LOST_ANNOTATION, OUT_OF_SERVICE_TAINT};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;

const GRACE: Duration = Duration::from_secs(300);

fn opts(builtin: bool) -> Options {
    Options {
        builtin,
        sweep_orphaned_claims: false,
        node_loss_grace: GRACE,
        driver_name: DRIVER.into(),
        snapshot_class: "kennel".into(),
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
    /// Nodes as an uncached GET returns them.
    fresh: Vec<Node>,
}

fn world(set: StatefulSet, claims: Vec<PersistentVolumeClaim>, pods: Vec<Pod>) -> World {
    World {
        set,
        claims,
        pods,
        volumes: vec![],
        nodes: vec![],
        gone: vec![],
        fresh: vec![],
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
        for node in &self.fresh {
            nodes.insert_fresh(node);
        }
        plan(
            Observed {
                set: &self.set,
                claims: &claims,
                pods: &pods,
                volumes: &volumes,
                nodes: &nodes,
                snapshots: &[],
            },
            opts,
        )
    }

    /// The claim a write names, after checking its precondition; its resourceVersion moves on.
    fn written_claim(&mut self, claim: &str, resource_version: &str) -> &mut PersistentVolumeClaim {
        let c = self
            .claims
            .iter_mut()
            .find(|c| c.metadata.name.as_deref() == Some(claim))
            .expect("claim exists");
        assert_eq!(
            c.metadata.resource_version.as_deref(),
            Some(resource_version)
        );
        let next: u64 = resource_version.parse::<u64>().expect("numeric") + 1000;
        c.metadata.resource_version = Some(next.to_string());
        c
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
                    let c = self.written_claim(claim, resource_version);
                    c.metadata.owner_references =
                        (!owner_references.is_empty()).then(|| owner_references.clone());
                }
                Action::SetClaimAnnotation {
                    claim,
                    resource_version,
                    key,
                    value,
                } => {
                    let c = self.written_claim(claim, resource_version);
                    let notes = c.metadata.annotations.get_or_insert_with(Default::default);
                    match value {
                        Some(v) => notes.insert(key.to_string(), v.clone()),
                        None => notes.remove(*key),
                    };
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
    recreated_at(p, "1101")
}

/// The claim and then the pod deleted, the claim at resourceVersion `rv`.
fn recreated_at(p: &Plan, rv: &str) -> bool {
    writes(p)
        == vec![
            &Action::DeleteClaim {
                claim: "data-web-1".into(),
                uid: claim_uid(1),
                resource_version: rv.into(),
            },
            &Action::DeletePod {
                pod: "web-1".into(),
                uid: pod_uid(1),
            },
        ]
}

/// The write that records, at `now`, that data-web-1's node is lost.
fn records_loss(p: &Plan, now: Timestamp) -> bool {
    writes(p)
        == vec![&Action::SetClaimAnnotation {
            claim: "data-web-1".into(),
            resource_version: "101".into(),
            key: NODE_LOST_ANNOTATION,
            value: Some(crate::retention::nodeloss::loss_record("node-b", now)),
        }]
}

fn at(seconds: i64) -> Options {
    let mut o = opts(false);
    o.now = ts(seconds);
    o
}

#[test]
fn node_deleted_recreates_the_claim_a_grace_period_after_it_was_first_seen() {
    let mut w = node_loss_world(Some("recreate"));
    w.gone = vec!["node-b"];
    // The pod has waited far longer than the grace period, but the evidence is new: it is
    // recorded on the claim, announced once, and the grace period starts now.
    let p = w.plan(&at(0));
    assert!(records_loss(&p, ts(0)), "{p:?}");
    assert_eq!(reasons(&p), vec!["NodeLost"]);
    assert_eq!(p.requeue_after, Some(Duration::from_secs(300)));
    w.apply(&p);
    // Inside the grace period: nothing written, nothing said again, back when it ends.
    let p = w.plan(&at(60));
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(240)));
    // Past it, from the recorded moment (a restarted controller counts the same).
    let p = w.plan(&at(300));
    assert!(recreated(&p), "{p:?}");
    assert_eq!(
        reasons(&p),
        vec!["ClaimRecreatedAfterNodeLoss", "PodRecreatedAfterNodeLoss"]
    );
}

#[test]
fn node_loss_waits_by_default_and_says_so_once() {
    for annotation in [None, Some("wait"), Some("yes")] {
        let mut w = node_loss_world(annotation);
        w.gone = vec!["node-b"];
        let p = w.plan(&at(0));
        assert!(records_loss(&p, ts(0)), "{annotation:?}: {p:?}");
        assert_eq!(reasons(&p), vec!["NodeLost"]);
        assert_eq!(p.requeue_after, None);
        w.apply(&p);
        for later in [10, 3600, 86400] {
            assert_eq!(w.plan(&at(later)), Plan::default(), "{annotation:?}");
        }
    }
}

#[test]
fn out_of_service_taint_is_evidence_once_read_uncached() {
    let mut w = node_loss_world(Some("recreate"));
    let tainted = out_of_service(not_ready_since(node("node-b", "m-b", false), ts(-600)));
    // The watch cache alone never decides.
    w.nodes.push(tainted.clone());
    let p = w.plan(&at(0));
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.unconfirmed_nodes, vec!["node-b".to_string()]);
    // The uncached read says the taint is gone again: nothing happens.
    w.fresh = vec![node("node-b", "m-b", true)];
    assert_eq!(w.plan(&at(0)), Plan::default());
    // The uncached read confirms it: recorded now, recreated a grace period later.
    w.fresh = vec![tainted];
    let p = w.plan(&at(0));
    assert!(records_loss(&p, ts(0)), "{p:?}");
    let m = messages(&p, "NodeLost");
    assert!(m[0].contains(OUT_OF_SERVICE_TAINT), "{m:?}");
    w.apply(&p);
    assert!(recreated(&w.plan(&at(300))));
}

#[test]
fn a_node_that_comes_back_clears_the_record_and_restarts_the_clock() {
    let mut w = node_loss_world(Some("recreate"));
    w.gone = vec!["node-b"];
    let p = w.plan(&at(0));
    w.apply(&p);
    // The node registers again before the grace period ends.
    w.gone.clear();
    w.nodes.push(node("node-b", "m-b", true));
    let p = w.plan(&at(200));
    assert_eq!(reasons(&p), vec!["NodeLossCleared"]);
    assert_eq!(
        writes(&p),
        vec![&Action::SetClaimAnnotation {
            claim: "data-web-1".into(),
            resource_version: "1101".into(),
            key: NODE_LOST_ANNOTATION,
            value: None,
        }]
    );
    w.apply(&p);
    // Deleted again later: a new grace period from then, not from the first sighting.
    w.nodes.pop();
    w.gone = vec!["node-b"];
    let p = w.plan(&at(400));
    assert_eq!(reasons(&p), vec!["NodeLost"]);
    w.apply(&p);
    assert!(w.plan(&at(600)).actions.is_empty());
    assert!(recreated_at(&w.plan(&at(700)), "3101"));
}

#[test]
fn a_record_for_another_node_is_stale() {
    let mut w = node_loss_world(Some("recreate"));
    w.gone = vec!["node-b"];
    w.claims[1]
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            NODE_LOST_ANNOTATION.into(),
            crate::retention::nodeloss::loss_record("node-x", ts(-3600)),
        );
    let p = w.plan(&at(0));
    assert!(
        matches!(
            writes(&p)[..],
            [Action::SetClaimAnnotation { value: Some(_), .. }]
        ),
        "{p:?}"
    );
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
        let p = w.plan(&opts(false));
        assert!(writes(&p).is_empty(), "{case}: {p:?}");
        assert!(p.unconfirmed_nodes.is_empty());
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
fn not_ready_is_never_evidence_however_long() {
    // The kubelet is gone for a day and the driver is missing from the node's CSINode (its
    // plugin restarts): the node may come back with its disk. Nothing is recorded or deleted.
    let mut w = node_loss_world(Some("recreate"));
    let down = not_ready_since(node("node-b", "m-b", false), ts(-86400));
    w.nodes.push(down.clone());
    w.fresh = vec![down];
    assert_eq!(w.plan(&at(0)), Plan::default());
}

#[test]
fn deletions_are_announced_before_they_happen() {
    let mut w = node_loss_world(Some("recreate"));
    w.gone = vec!["node-b"];
    let p = w.plan(&at(0));
    w.apply(&p);
    let p = w.plan(&at(300));
    let position =
        |pred: &dyn Fn(&Action) -> bool| p.actions.iter().position(pred).expect("action present");
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
