//! The grant chain: claim on the requester → VolumeSnapshot → content → this snapshot here.

use http::StatusCode;
use serde_json::{json, Value};

use super::{failure, node, scripted};
use crate::csi::snapshot_handle::handle;
use crate::model::id::SnapshotId;
use crate::peer::cluster::KubeGrants;
use crate::peer::server::Grants;
use crate::retention::mock_api::{expect, not_found, Exchange};

const DRIVER: &str = "kennel.csi.dev";
const CLAIM: &str = "/api/v1/namespaces/shop/persistentvolumeclaims/data-db-0";
const SNAPSHOT: &str = "/apis/snapshot.storage.k8s.io/v1/namespaces/shop/volumesnapshots/nightly";
const CONTENT: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/snapcontent-1";

fn id() -> SnapshotId {
    SnapshotId::parse("ks-0a1b2c3d4e5f6g7h8i9j0k1l").expect("test setup")
}

/// Claim `shop/data-db-0`, placed on node-b, restored from VolumeSnapshot `nightly`.
fn claim() -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "data-db-0", "namespace": "shop", "uid": "uid-claim",
            "annotations": {"volume.kubernetes.io/selected-node": "node-b"},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "kennel",
            "dataSource": {
                "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "nightly"
            },
        },
    })
}

fn snapshot() -> Value {
    json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "nightly", "namespace": "shop", "uid": "uid-vs"},
        "spec": {"source": {"persistentVolumeClaimName": "data-db-1"}},
        "status": {"boundVolumeSnapshotContentName": "snapcontent-1", "readyToUse": true},
    })
}

/// The content of `nightly`: snapshot `id()` held by node-a, the serving node.
fn content() -> Value {
    json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": {"name": "snapcontent-1"},
        "spec": {
            "driver": DRIVER,
            "deletionPolicy": "Delete",
            "source": {"volumeHandle": "kv-0a1b2c3d4e5f6g7h8i9j0k1l@node-a"},
            "volumeSnapshotRef": {"namespace": "shop", "name": "nightly", "uid": "uid-vs"},
        },
        "status": {"snapshotHandle": handle(&id(), "node-a"), "readyToUse": true},
    })
}

/// `v` with the field at JSON pointer `pointer` set to `value` (removed for `Null`).
fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let key = &key.replace("~1", "/").replace("~0", "~");
    let parent = v.pointer_mut(parent).expect("parent exists");
    match value {
        Value::Null => {
            parent.as_object_mut().expect("object").remove(key);
        }
        value => parent[key] = value,
    }
    v
}

fn get(path: &str, reply: Value) -> Exchange {
    expect("GET", path, None, reply)
}

/// Whether node-b may read `id()` for `shop/data-db-0`, asked of node-a's grants.
async fn ask(script: Vec<Exchange>) -> anyhow::Result<bool> {
    scripted(script, |client| async move {
        KubeGrants::new(client, node("node-a"), DRIVER)
            .granted(&node("node-b"), &id(), "shop", "data-db-0")
            .await
    })
    .await
}

async fn refused(script: Vec<Exchange>, what: &str) {
    assert!(!ask(script).await.expect(what), "{what} must be refused");
}

#[tokio::test]
async fn the_whole_chain_grants() {
    let script = vec![
        get(CLAIM, claim()),
        get(SNAPSHOT, snapshot()),
        get(CONTENT, content()),
    ];
    assert!(ask(script).await.expect("checked"));
}

#[tokio::test]
async fn a_bare_handle_of_an_older_driver_grants() {
    let bare = with(content(), "/status/snapshotHandle", json!(id().as_str()));
    let script = vec![
        get(CLAIM, claim()),
        get(SNAPSHOT, snapshot()),
        get(CONTENT, bare),
    ];
    assert!(ask(script).await.expect("checked"));
}

#[tokio::test]
async fn data_source_ref_is_read_first() {
    let source = json!({
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "nightly"
    });
    // dataSource says a claim, dataSourceRef the snapshot: the ref wins.
    let claim_with_ref = with(
        with(claim(), "/spec/dataSourceRef", source.clone()),
        "/spec/dataSource",
        json!({"kind": "PersistentVolumeClaim", "name": "data-db-1"}),
    );
    let script = vec![
        get(CLAIM, claim_with_ref),
        get(SNAPSHOT, snapshot()),
        get(CONTENT, content()),
    ];
    assert!(ask(script).await.expect("checked"));

    let mut elsewhere = source;
    elsewhere["namespace"] = json!("other");
    let claim_elsewhere = with(claim(), "/spec/dataSourceRef", elsewhere);
    refused(
        vec![get(CLAIM, claim_elsewhere)],
        "a snapshot in another namespace",
    )
    .await;
}

#[tokio::test]
async fn a_claim_not_placed_on_the_requester_is_refused() {
    refused(
        vec![not_found("GET", CLAIM, "claim")],
        "a claim that does not exist",
    )
    .await;
    let elsewhere = with(
        claim(),
        "/metadata/annotations/volume.kubernetes.io~1selected-node",
        json!("node-c"),
    );
    refused(
        vec![get(CLAIM, elsewhere)],
        "a claim placed on another node",
    )
    .await;
    let unplaced = with(claim(), "/metadata/annotations", Value::Null);
    refused(vec![get(CLAIM, unplaced)], "a claim placed nowhere yet").await;
    let deleting = with(
        claim(),
        "/metadata/deletionTimestamp",
        json!("2024-01-01T00:00:00Z"),
    );
    refused(vec![get(CLAIM, deleting)], "a claim being deleted").await;
}

#[tokio::test]
async fn a_claim_not_restored_from_a_snapshot_is_refused() {
    let from_claim = with(
        claim(),
        "/spec/dataSource",
        json!({"kind": "PersistentVolumeClaim", "name": "data-db-1"}),
    );
    refused(vec![get(CLAIM, from_claim)], "a claim cloned from a claim").await;
    let no_source = with(claim(), "/spec/dataSource", Value::Null);
    refused(vec![get(CLAIM, no_source)], "an empty claim").await;
    let other_group = with(claim(), "/spec/dataSource/apiGroup", json!("example.com"));
    refused(
        vec![get(CLAIM, other_group)],
        "a VolumeSnapshot of another group",
    )
    .await;
}

#[tokio::test]
async fn a_missing_or_unbound_snapshot_is_refused() {
    refused(
        vec![get(CLAIM, claim()), not_found("GET", SNAPSHOT, "snapshot")],
        "a missing VolumeSnapshot",
    )
    .await;
    let unbound = with(snapshot(), "/status", Value::Null);
    refused(
        vec![get(CLAIM, claim()), get(SNAPSHOT, unbound)],
        "an unbound VolumeSnapshot",
    )
    .await;
    refused(
        vec![
            get(CLAIM, claim()),
            get(SNAPSHOT, snapshot()),
            not_found("GET", CONTENT, "content"),
        ],
        "a missing VolumeSnapshotContent",
    )
    .await;
}

#[tokio::test]
async fn content_of_another_snapshot_node_driver_or_binding_is_refused() {
    let other = SnapshotId::parse("ks-zzzzzzzzzzzzzzzzzzzzzzzz").expect("test setup");
    for (what, bad) in [
        (
            "another snapshot's handle",
            with(
                content(),
                "/status/snapshotHandle",
                json!(handle(&other, "node-a")),
            ),
        ),
        (
            "another snapshot's bare handle",
            with(content(), "/status/snapshotHandle", json!(other.as_str())),
        ),
        (
            "another node's handle",
            with(
                content(),
                "/status/snapshotHandle",
                json!(handle(&id(), "node-c")),
            ),
        ),
        ("no handle yet", with(content(), "/status", Value::Null)),
        (
            "another driver's content",
            with(content(), "/spec/driver", json!("other.csi.example.com")),
        ),
        (
            "a content bound to another VolumeSnapshot",
            with(content(), "/spec/volumeSnapshotRef/name", json!("weekly")),
        ),
        (
            "a content bound in another namespace",
            with(
                content(),
                "/spec/volumeSnapshotRef/namespace",
                json!("other"),
            ),
        ),
    ] {
        let script = vec![
            get(CLAIM, claim()),
            get(SNAPSHOT, snapshot()),
            get(CONTENT, bad),
        ];
        refused(script, what).await;
    }
}

#[tokio::test]
async fn api_failures_are_errors_not_refusals() {
    let err = ask(vec![failure(
        "GET",
        CLAIM,
        StatusCode::INTERNAL_SERVER_ERROR,
    )])
    .await
    .expect_err("an unreadable claim is no answer");
    assert!(
        format!("{err:#}").contains("claim shop/data-db-0"),
        "{err:#}"
    );
    let err = ask(vec![
        get(CLAIM, claim()),
        get(SNAPSHOT, snapshot()),
        failure("GET", CONTENT, StatusCode::FORBIDDEN),
    ])
    .await
    .expect_err("a forbidden read is no answer");
    assert!(format!("{err:#}").contains("snapcontent-1"), "{err:#}");
}
