//! Peer addresses: one Lease per node, applied server-side, read back and checked.

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock;

use super::{failure, node, scripted, take};
use crate::peer::cluster::{advertise, lease_name, peer_address};
use crate::peer::NodeName;
use crate::retention::mock_api::{expect, not_found};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kennel-system/leases";

/// Kubernetes' own rule for object names (IsDNS1123Subdomain): at most 253 characters,
/// dot-separated parts of [a-z0-9-] with an alphanumeric at both ends.
fn valid_object_name(name: &str) -> bool {
    let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 253
        && name.split('.').all(|part| {
            part.starts_with(edge)
                && part.ends_with(edge)
                && part.chars().all(|c| edge(c) || c == '-')
        })
}

/// What `advertise(node, address)` sends, answered as the API server would (echoed).
async fn applied(node: &NodeName, address: SocketAddr) -> (String, Value) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let who = node.clone();
    let call = tokio::spawn(async move { advertise(&client, &who, address).await });
    let (method, path, body) = take(&mut handle, Value::clone).await;
    call.await.expect("joined").expect("advertised");
    assert_eq!(method, "PATCH");
    (path, body)
}

#[tokio::test]
async fn advertise_applies_exactly_the_nodes_lease() {
    let (path, body) = applied(&node("node-b"), "10.0.0.2:7443".parse().expect("addr")).await;
    let (path, query) = path.split_once('?').expect("a query");
    assert_eq!(path, format!("{LEASES}/kennel-peer-node-b"));
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort_unstable();
    assert_eq!(params, ["fieldManager=kennel-peer", "force=true"]);
    // Exactly these fields: a server-side apply owns what it sends, and nothing else.
    assert_eq!(
        body,
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "kennel-peer-node-b",
                "namespace": "kennel-system",
                "annotations": {"kennel.csi.dev/peer-address": "10.0.0.2:7443"},
            },
            "spec": {"holderIdentity": "node-b"},
        })
    );
}

#[tokio::test]
async fn an_advertised_address_reads_back() {
    for raw in ["10.0.0.2:7443", "[fd00::2]:7443"] {
        let address: SocketAddr = raw.parse().expect("addr");
        let (path, lease) = applied(&node("node-b"), address).await;
        let path = path.split('?').next().expect("path").to_owned();
        let script = vec![expect("GET", &path, None, lease)];
        let found = scripted(script, |client| async move {
            peer_address(&client, &node("node-b")).await
        })
        .await
        .expect("read");
        assert_eq!(found, Some(address), "{raw}");
    }
}

#[tokio::test]
async fn addresses_no_peer_can_reach_are_not_advertised() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    for raw in ["0.0.0.0:7443", "[::]:7443", "10.0.0.2:0"] {
        let err = advertise(&client, &node("node-b"), raw.parse().expect("addr"))
            .await
            .expect_err(raw);
        assert!(
            err.to_string().contains("no address a peer can connect to"),
            "{err}"
        );
    }
    drop(client);
    assert!(handle.next_request().await.is_none(), "no request made");
}

fn lease(annotations: Value, holder: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kennel-peer-node-b", "namespace": "kennel-system",
                     "annotations": annotations},
        "spec": {"holderIdentity": holder},
    })
}

async fn read(reply: Value) -> anyhow::Result<Option<SocketAddr>> {
    let path = format!("{LEASES}/kennel-peer-node-b");
    scripted(
        vec![expect("GET", &path, None, reply)],
        |client| async move { peer_address(&client, &node("node-b")).await },
    )
    .await
}

#[tokio::test]
async fn no_lease_or_no_annotation_is_no_address() {
    let path = format!("{LEASES}/kennel-peer-node-b");
    let found = scripted(
        vec![not_found("GET", &path, "lease")],
        |client| async move { peer_address(&client, &node("node-b")).await },
    )
    .await
    .expect("read");
    assert_eq!(found, None);
    assert_eq!(read(lease(json!({}), "node-b")).await.expect("read"), None);
}

#[tokio::test]
async fn malformed_or_foreign_leases_are_errors() {
    for bad in [
        "10.0.0.2",
        "node-b:7443",
        "10.0.0.2:99999",
        "",
        "0.0.0.0:7443",
        "10.0.0.2:0",
    ] {
        let err = read(lease(json!({"kennel.csi.dev/peer-address": bad}), "node-b"))
            .await
            .expect_err(bad);
        assert!(
            format!("{err:#}").contains("kennel.csi.dev/peer-address"),
            "{bad}: {err:#}"
        );
    }
    let err = read(lease(
        json!({"kennel.csi.dev/peer-address": "10.0.0.3:7443"}),
        "node-c",
    ))
    .await
    .expect_err("held by another node");
    assert!(format!("{err:#}").contains("not by node node-b"), "{err:#}");

    let path = format!("{LEASES}/kennel-peer-node-b");
    let err = scripted(
        vec![failure("GET", &path, StatusCode::SERVICE_UNAVAILABLE)],
        |client| async move { peer_address(&client, &node("node-b")).await },
    )
    .await
    .expect_err("an unreadable Lease");
    assert!(format!("{err:#}").contains("reading Lease"), "{err:#}");
}

#[test]
fn lease_names_fit_however_long_the_node_name() {
    // Up to 241 characters of node name the Lease is named after it as it is.
    let fits = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(49)
    );
    assert_eq!(fits.len(), 241);
    assert_eq!(lease_name(&node(&fits)), format!("kennel-peer-{fits}"));
    assert_eq!(lease_name(&node(&fits)).len(), 253);

    // Longer ones: as much as fits, then a hash of the whole name. The cut falls right after a
    // '.' here (index 223), which must not end up before the suffix's '-'.
    let long = |last: &str| {
        format!(
            "{}.{}.{}.{}.{last}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(31)
        )
    };
    let (one, two) = (long(&"e".repeat(29)), long(&format!("{}f", "e".repeat(28))));
    assert_eq!((one.len(), two.len()), (253, 253));
    assert_eq!(one.as_bytes()[223], b'.');
    let (a, b) = (lease_name(&node(&one)), lease_name(&node(&two)));
    for name in [&a, &b] {
        assert!(valid_object_name(name), "{name}");
        assert!(
            name.starts_with(&format!("kennel-peer-{}", "a".repeat(63))),
            "{name}"
        );
        assert!(!name.contains(".-"), "{name}");
    }
    assert_ne!(
        a, b,
        "names alike up to the cut still get Leases of their own"
    );
    assert_eq!(
        a,
        lease_name(&node(&one)),
        "the same node always gets the same Lease"
    );
    let just_over = format!("{fits}d");
    let c = lease_name(&node(&just_over));
    assert!(
        valid_object_name(&c) && c != format!("kennel-peer-{just_over}"),
        "{c}"
    );
}

#[tokio::test]
async fn a_long_node_advertises_under_its_hashed_name() {
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    let long = node(&name);
    let (path, body) = applied(&long, "10.0.0.9:7443".parse().expect("addr")).await;
    let expected = lease_name(&long);
    assert_eq!(
        path.split('?').next(),
        Some(format!("{LEASES}/{expected}").as_str())
    );
    assert_eq!(body["metadata"]["name"], expected);
    assert_eq!(body["spec"]["holderIdentity"], name);
}
