//! The reconciler against a mocked API server: exact requests, in order, under a timeout.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::client::Body;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

use super::{error_policy, reconcile, Context, Error, Settings, REPORTER};
use crate::retention::fixtures::*;
use crate::retention::mock_api::{conflict, event_about, expect, not_found, serve, Exchange};
use crate::retention::nodeloss::NODE_LOST_ANNOTATION;
use crate::retention::policy::ON_NODE_LOSS_ANNOTATION;
use crate::retention::rbac;
use crate::retention::retention_metrics::Metrics;

fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

struct Cluster {
    claims: Vec<PersistentVolumeClaim>,
    pods: Vec<Pod>,
    volumes: Vec<PersistentVolume>,
    nodes: Vec<Node>,
}

fn context(cluster: Cluster) -> (Arc<Context>, Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context {
        recorder: Recorder::new(client.clone(), REPORTER.into()),
        client,
        claims: store(cluster.claims),
        pods: store(cluster.pods),
        volumes: store(cluster.volumes),
        nodes: store(cluster.nodes),
        settings: Settings {
            builtin: crate::retention::builtin::BuiltinRule::Never,
            sweep_orphaned_claims: false,
            node_loss_grace: Duration::from_secs(300),
            snapshot_class: "kennel".into(),
            driver_name: DRIVER.into(),
            resync_interval: Duration::from_secs(600),
        },
        metrics: Arc::new(Metrics::default()),
        clock: || ts(0),
    };
    (Arc::new(ctx), handle)
}

/// Every request the retention controller makes must be granted by its ClusterRole.
fn rbac_allows(method: &str, path: &str) -> bool {
    let (group, resource, verb) = rbac::classify(method, path).expect("API request");
    rbac::allows(&group, &resource, &verb)
}

async fn run_scenario(
    set: StatefulSet,
    cluster: Cluster,
    script: Vec<Exchange>,
) -> (
    Result<kube::runtime::controller::Action, Error>,
    Arc<Context>,
) {
    let (ctx, handle) = context(cluster);
    let server = tokio::spawn(serve(handle, script, rbac_allows));
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        reconcile(Arc::new(set), ctx.clone()),
    )
    .await
    .expect("reconcile finished in time");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server finished in time")
        .expect("every request as expected");
    (result, ctx)
}

const SETS: &str = "/apis/apps/v1/namespaces/default/statefulsets/web";
const CLAIMS: &str = "/api/v1/namespaces/default/persistentvolumeclaims";
const PODS: &str = "/api/v1/namespaces/default/pods";

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serializable")
}

#[tokio::test]
async fn scale_down_writes_the_pod_ref_with_resource_version() {
    let web = set(1, Some(("Retain", "Delete")));
    let cluster = Cluster {
        claims: vec![claim(0, vec![]), claim(1, vec![])],
        pods: vec![pod(0), pod(1)],
        volumes: vec![],
        nodes: vec![],
    };
    let script = vec![
        expect("GET", SETS, None, to_json(&web)),
        event_about("ClaimOwnersUpdated", "PersistentVolumeClaim", "data-web-1"),
        expect(
            "PATCH",
            &format!("{CLAIMS}/data-web-1"),
            Some(json!({"metadata": {
                "resourceVersion": "101",
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Pod", "name": "web-1", "uid": "uid-pod-1",
                    "controller": true, "blockOwnerDeletion": true
                }]
            }})),
            to_json(&claim(1, vec![pod_ref(1)])),
        ),
    ];
    let (result, ctx) = run_scenario(web, cluster, script).await;
    let action = result.expect("reconciled");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(600))
    );
    assert_eq!(ctx.metrics.action_count("claim_owners"), 1);
}

#[tokio::test]
async fn a_set_that_moved_since_the_cache_is_planned_again() {
    // The cache still says 1 replica; the server already says 2: ordinal 1 is not condemned.
    let cached = set(1, Some(("Retain", "Delete")));
    let mut fresh = set(2, Some(("Retain", "Delete")));
    fresh.metadata.resource_version = Some("11".into());
    let cluster = Cluster {
        claims: vec![claim(0, vec![]), claim(1, vec![])],
        pods: vec![pod(0), pod(1)],
        volumes: vec![],
        nodes: vec![],
    };
    let script = vec![expect("GET", SETS, None, to_json(&fresh))];
    let (result, _) = run_scenario(cached, cluster, script).await;
    result.expect("reconciled");
}

#[tokio::test]
async fn reattach_removes_the_stale_pod_ref() {
    // Scaled 3 -> 1 -> 3: claim 2 still points at the pod that was condemned and is gone.
    let web = set(3, Some(("Retain", "Delete")));
    let cluster = Cluster {
        claims: vec![
            claim(0, vec![]),
            claim(1, vec![]),
            claim(2, vec![pod_ref_uid(2, "uid-earlier")]),
        ],
        pods: vec![pod(0), pod(1)],
        volumes: vec![],
        nodes: vec![],
    };
    let script = vec![
        expect("GET", SETS, None, to_json(&web)),
        event_about("StaleOwnerRemoved", "PersistentVolumeClaim", "data-web-2"),
        expect(
            "PATCH",
            &format!("{CLAIMS}/data-web-2"),
            Some(json!({"metadata": {"resourceVersion": "102", "ownerReferences": []}})),
            to_json(&claim(2, vec![])),
        ),
    ];
    let (result, ctx) = run_scenario(web, cluster, script).await;
    result.expect("reconciled");
    assert_eq!(ctx.metrics.action_count("claim_owners"), 1);
}

/// Two ordinals, web-1 waiting unscheduled since `since` on node-b's volume; node-b as
/// `node_b` shows it (absent: `None`).
fn stranded(since: i64, claim_1: PersistentVolumeClaim, node_b: Option<Node>) -> Cluster {
    Cluster {
        claims: vec![claim(0, vec![]), claim_1],
        pods: vec![pod(0), unschedulable(pod(1), ts(since))],
        volumes: vec![pv(0, "node-a", "m-a"), pv(1, "node-b", "m-b")],
        nodes: std::iter::once(node("node-a", "m-a", true))
            .chain(node_b)
            .collect(),
    }
}

/// A set that opted in to node-loss recovery.
fn recreating_set() -> StatefulSet {
    annotate(
        set(2, Some(("Retain", "Retain"))),
        ON_NODE_LOSS_ANNOTATION,
        "recreate",
    )
}

#[tokio::test]
async fn node_loss_recovery_deletes_claim_then_pod_then_cleans_the_volume() {
    let web = recreating_set();
    let cluster = |claim_1| stranded(-600, claim_1, None);
    // First pass: the evidence is new. It is recorded on the claim, announced, and nothing
    // is deleted however long the pod has waited.
    let record = crate::retention::nodeloss::loss_record("node-b", ts(0));
    let script = vec![
        not_found("GET", "/api/v1/nodes/node-b", "nodes \"node-b\""),
        expect("GET", SETS, None, to_json(&web)),
        expect(
            "PATCH",
            &format!("{CLAIMS}/data-web-1"),
            Some(json!({"metadata": {
                "resourceVersion": "101",
                "annotations": {NODE_LOST_ANNOTATION: record}
            }})),
            to_json(&claim(1, vec![])),
        ),
        event_about("NodeLost", "Pod", "web-1"),
    ];
    let (result, ctx) = run_scenario(web.clone(), cluster(claim(1, vec![])), script).await;
    result.expect("reconciled");
    assert_eq!(ctx.metrics.action_count("claim_delete"), 0);

    // A grace period after the recorded moment (here: a restarted controller that only has
    // the record), the evidence is read again uncached, then claim and pod are deleted.
    let mut recorded = claim(1, vec![]);
    recorded.metadata.annotations = Some(
        [(
            NODE_LOST_ANNOTATION.to_string(),
            crate::retention::nodeloss::loss_record("node-b", ts(-300)),
        )]
        .into(),
    );
    let script = vec![
        not_found("GET", "/api/v1/nodes/node-b", "nodes \"node-b\""),
        expect("GET", SETS, None, to_json(&web)),
        event_about(
            "ClaimRecreatedAfterNodeLoss",
            "PersistentVolumeClaim",
            "data-web-1",
        ),
        expect(
            "DELETE",
            &format!("{CLAIMS}/data-web-1"),
            Some(json!({"preconditions": {"uid": "uid-claim-1", "resourceVersion": "101"}})),
            to_json(&claim_terminating(claim(1, vec![]))),
        ),
        event_about("PodRecreatedAfterNodeLoss", "Pod", "web-1"),
        expect(
            "DELETE",
            &format!("{PODS}/web-1"),
            Some(json!({"preconditions": {"uid": "uid-pod-1"}})),
            to_json(&pod(1)),
        ),
    ];
    let (result, _) = run_scenario(web.clone(), cluster(recorded), script).await;
    result.expect("reconciled");

    // Next pass: the claim is gone and its PV released; its node is still gone.
    let cluster = Cluster {
        claims: vec![claim(0, vec![])],
        pods: vec![pod(0)],
        volumes: vec![pv(0, "node-a", "m-a"), released(pv(1, "node-b", "m-b"))],
        nodes: vec![node("node-a", "m-a", true)],
    };
    let script = vec![
        not_found("GET", "/api/v1/nodes/node-b", "nodes \"node-b\""),
        expect("GET", SETS, None, to_json(&web)),
        event_about("StaleVolumeCleaned", "PersistentVolume", "pv-1"),
        expect(
            "PATCH",
            "/api/v1/persistentvolumes/pv-1",
            Some(json!({"metadata": {
                "resourceVersion": "301",
                "finalizers": ["kubernetes.io/pv-protection"]
            }})),
            to_json(&released(pv(1, "node-b", "m-b"))),
        ),
        expect(
            "DELETE",
            "/api/v1/persistentvolumes/pv-1",
            Some(json!({"preconditions": {"uid": "uid-pv-1"}})),
            to_json(&released(pv(1, "node-b", "m-b"))),
        ),
    ];
    let (result, ctx) = run_scenario(web, cluster, script).await;
    result.expect("reconciled");
    assert_eq!(ctx.metrics.action_count("volume_delete"), 1);
}

#[tokio::test]
async fn node_present_on_the_server_but_not_in_the_cache_changes_nothing() {
    let web = recreating_set();
    let cluster = stranded(-600, claim(1, vec![]), None);
    let script = vec![expect(
        "GET",
        "/api/v1/nodes/node-b",
        None,
        to_json(&node("node-b", "m-b", false)),
    )];
    let (result, _) = run_scenario(web, cluster, script).await;
    result.expect("reconciled");
}

#[tokio::test]
async fn a_conflicting_write_requeues_soon() {
    let web = set(1, Some(("Retain", "Delete")));
    let cluster = Cluster {
        claims: vec![claim(0, vec![]), claim(1, vec![])],
        pods: vec![pod(0), pod(1)],
        volumes: vec![],
        nodes: vec![],
    };
    let script = vec![
        expect("GET", SETS, None, to_json(&web)),
        event_about("ClaimOwnersUpdated", "PersistentVolumeClaim", "data-web-1"),
        conflict("PATCH", &format!("{CLAIMS}/data-web-1")),
    ];
    let (result, ctx) = run_scenario(web.clone(), cluster, script).await;
    let error = result.expect_err("conflict surfaces");
    assert!(matches!(error, Error::Conflict { .. }), "{error}");
    let action = error_policy(Arc::new(web), &error, ctx.clone());
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(2))
    );
    assert!(ctx
        .metrics
        .render()
        .contains("failures_total{error=\"conflict\"} 1"));
}

#[tokio::test]
async fn two_actions_with_one_reason_are_two_readable_events() {
    // Scale 3 -> 1 with whenScaled=Delete: two claims get their pod reference. Each event is
    // about its own claim, so neither is merged into the other's series.
    let web = set(1, Some(("Retain", "Delete")));
    let cluster = Cluster {
        claims: vec![claim(0, vec![]), claim(1, vec![]), claim(2, vec![])],
        pods: vec![pod(0), pod(1), pod(2)],
        volumes: vec![],
        nodes: vec![],
    };
    let mut script = vec![expect("GET", SETS, None, to_json(&web))];
    for ordinal in [1, 2] {
        let name = format!("data-web-{ordinal}");
        let mut announced = event_about("ClaimOwnersUpdated", "PersistentVolumeClaim", &name);
        announced.body.as_mut().expect("body").as_object_mut().expect("object").insert(
            "related".into(),
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "namespace": "default", "uid": SET_UID}),
        );
        script.push(announced);
        script.push(expect(
            "PATCH",
            &format!("{CLAIMS}/{name}"),
            None,
            to_json(&claim(ordinal, vec![pod_ref(ordinal)])),
        ));
    }
    let (result, ctx) = run_scenario(web, cluster, script).await;
    result.expect("reconciled");
    assert_eq!(ctx.metrics.action_count("claim_owners"), 2);
}

#[tokio::test]
async fn an_out_of_service_taint_is_read_again_uncached_before_it_is_recorded() {
    let web = recreating_set();
    let tainted = out_of_service(not_ready_since(node("node-b", "m-b", false), ts(-600)));
    let cluster = || stranded(-600, claim(1, vec![]), Some(tainted.clone()));
    const NODE: &str = "/api/v1/nodes/node-b";
    // The cache is behind: the taint was removed. Nothing is written.
    let script = vec![expect(
        "GET",
        NODE,
        None,
        to_json(&node("node-b", "m-b", true)),
    )];
    let (result, _) = run_scenario(web.clone(), cluster(), script).await;
    result.expect("reconciled");

    // The server confirms the taint: the loss is recorded and announced, nothing deleted yet.
    let script = vec![
        expect("GET", NODE, None, to_json(&tainted)),
        expect("GET", SETS, None, to_json(&web)),
        expect(
            "PATCH",
            &format!("{CLAIMS}/data-web-1"),
            None,
            to_json(&claim(1, vec![])),
        ),
        event_about("NodeLost", "Pod", "web-1"),
    ];
    let (result, ctx) = run_scenario(web, cluster(), script).await;
    result.expect("reconciled");
    assert_eq!(ctx.metrics.action_count("claim_annotation"), 1);
    assert_eq!(ctx.metrics.action_count("claim_delete"), 0);
}

/// A pass planned from a cache that does not show the record yet (another pass just wrote it)
/// fails its write and announces nothing: the loss is announced once.
#[tokio::test]
async fn a_loss_already_recorded_is_not_announced_again_from_a_stale_cache() {
    let web = recreating_set();
    let script = vec![
        not_found("GET", "/api/v1/nodes/node-b", "nodes \"node-b\""),
        expect("GET", SETS, None, to_json(&web)),
        conflict("PATCH", &format!("{CLAIMS}/data-web-1")),
    ];
    // The script ends at the failed write: an announcement before it would not match.
    let (result, _) = run_scenario(web, stranded(-600, claim(1, vec![]), None), script).await;
    assert!(result.is_err(), "the stale write must fail the pass");
}

#[tokio::test]
async fn a_not_ready_node_is_never_lost() {
    let web = recreating_set();
    let down = not_ready_since(node("node-b", "m-b", false), ts(-86400));
    let cluster = stranded(-86400, claim(1, vec![]), Some(down));
    // No request at all: a NotReady node is not evidence, so nothing is read or written.
    let (result, _) = run_scenario(web, cluster, vec![]).await;
    result.expect("reconciled");
}

#[tokio::test]
async fn nothing_is_planned_before_every_cache_is_filled() {
    let (claims, _writer) = reflector::store::<PersistentVolumeClaim>();
    assert!(!super::caches_ready_within(&claims, Duration::from_millis(50)).await);
    assert!(super::caches_ready_within(&store::<Pod>(vec![]), Duration::from_millis(50)).await);
}
