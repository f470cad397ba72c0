//! The Kubernetes glue against a mocked API server: exact requests, in order, each allowed by
//! the rules `deploy/` grants the node's ServiceAccount for it.

mod address;
mod ca;
mod grants;

use std::future::Future;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

use super::{CLUSTER_RULES, NAMESPACE_RULES, PEER_NAMESPACE};
use crate::peer::pki::CA_SECRET_NAME;
use crate::peer::NodeName;
use crate::retention::mock_api::{serve, Exchange};
use crate::retention::rbac::{classify, grants};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

pub fn node(name: &str) -> NodeName {
    NodeName::parse(name).expect("test setup")
}

/// Whether the peer rules grant a request: cluster-wide reads for grants, and in the
/// driver's namespace only, the CA Secret by name (or a create) and Leases.
fn allowed(method: &str, path: &str) -> bool {
    let Some((group, resource, verb)) = classify(method, path) else {
        return false;
    };
    if grants(CLUSTER_RULES, &group, &resource, &verb) {
        return true;
    }
    let in_namespace = path
        .strip_prefix("/api/v1/namespaces/")
        .or_else(|| path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/"))
        .is_some_and(|rest| rest.starts_with(&format!("{PEER_NAMESPACE}/")));
    let named_ca = resource != "secrets"
        || verb == "create"
        || path.ends_with(&format!("/secrets/{CA_SECRET_NAME}"));
    in_namespace && named_ca && grants(NAMESPACE_RULES, &group, &resource, &verb)
}

/// Runs `call` against a client whose API server answers `script`, asserting every request.
pub async fn scripted<T, F: Future<Output = T>>(
    script: Vec<Exchange>,
    call: impl FnOnce(Client) -> F,
) -> T {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(serve(handle, script, allowed));
    let out = tokio::time::timeout(Duration::from_secs(5), call(client))
        .await
        .expect("call finished in time");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server finished in time")
        .expect("every request as expected");
    out
}

/// A request taken by hand: method, path with query, JSON body; answered by `reply`.
pub async fn take(
    handle: &mut ApiHandle,
    reply: impl FnOnce(&Value) -> Value,
) -> (String, String, Value) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request in time")
        .expect("a request");
    let method = request.method().to_string();
    let uri = request.uri().clone();
    assert!(
        allowed(&method, uri.path()),
        "{method} {uri} is not allowed by the peer RBAC rules"
    );
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    send.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .body(Body::from(serde_json::to_vec(&reply(&body)).expect("json")))
            .expect("response"),
    );
    let path = uri
        .path_and_query()
        .map(ToString::to_string)
        .unwrap_or_default();
    (method, path, body)
}

/// A failure of the API server itself (not a missing object).
pub fn failure(method: &'static str, path: &str, code: StatusCode) -> Exchange {
    Exchange {
        method,
        path: path.into(),
        body: None,
        status: code,
        reply: Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "try again", "reason": "InternalError", "code": code.as_u16()
        })),
        note_names: None,
    }
}

#[test]
fn the_rules_match_only_what_the_glue_calls() {
    assert!(allowed(
        "GET",
        "/api/v1/namespaces/kennel-system/secrets/kennel-peer-ca"
    ));
    assert!(allowed("POST", "/api/v1/namespaces/kennel-system/secrets?"));
    assert!(!allowed(
        "GET",
        "/api/v1/namespaces/kennel-system/secrets/other"
    ));
    assert!(!allowed("GET", "/api/v1/namespaces/kennel-system/secrets"));
    assert!(!allowed(
        "GET",
        "/api/v1/namespaces/default/secrets/kennel-peer-ca"
    ));
    assert!(!allowed(
        "PUT",
        "/api/v1/namespaces/kennel-system/secrets/kennel-peer-ca"
    ));
    assert!(!allowed(
        "DELETE",
        "/api/v1/namespaces/kennel-system/secrets/kennel-peer-ca"
    ));
    assert!(allowed(
        "PATCH",
        "/apis/coordination.k8s.io/v1/namespaces/kennel-system/leases/x"
    ));
    assert!(!allowed(
        "PATCH",
        "/apis/coordination.k8s.io/v1/namespaces/default/leases/x"
    ));
    assert!(allowed(
        "GET",
        "/api/v1/namespaces/shop/persistentvolumeclaims/data"
    ));
    assert!(!allowed(
        "GET",
        "/api/v1/namespaces/shop/persistentvolumeclaims"
    ));
    assert!(!allowed(
        "PATCH",
        "/api/v1/namespaces/shop/persistentvolumeclaims/data"
    ));
}
