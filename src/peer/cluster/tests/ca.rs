//! The CA Secret: made once, then only ever read.

use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock;

use super::{failure, scripted, take};
use crate::peer::cluster::load_or_create_ca;
use crate::peer::pki::{ClusterCa, TLS_CRT};
use crate::retention::mock_api::{expect, not_found, Exchange};

const SECRET: &str = "/api/v1/namespaces/kennel-system/secrets/kennel-peer-ca";
const SECRETS: &str = "/api/v1/namespaces/kennel-system/secrets";

fn secret_of(ca: &ClusterCa) -> Value {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("kennel-peer-ca".into()),
            namespace: Some("kennel-system".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(ca.to_secret_data()),
        ..Default::default()
    };
    serde_json::to_value(secret).expect("serializable")
}

fn already_exists() -> Exchange {
    Exchange {
        method: "POST",
        path: SECRETS.into(),
        body: Some(json!({"metadata": {"name": "kennel-peer-ca"}})),
        status: StatusCode::CONFLICT,
        reply: Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"kennel-peer-ca\" already exists", "reason": "AlreadyExists",
            "code": 409
        })),
        note_names: None,
    }
}

#[tokio::test]
async fn an_absent_ca_is_made_and_stored() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let call = tokio::spawn(async move { load_or_create_ca(&client).await });
    let first = handle.next_request().await.expect("a GET");
    assert_eq!(first.0.uri().path(), SECRET);
    first.1.send_response(
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(
                serde_json::to_vec(&json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404
                }))
                .expect("json"),
            ))
            .expect("response"),
    );
    let (method, path, body) = take(&mut handle, Value::clone).await;
    let ca = call.await.expect("joined").expect("a CA");
    assert_eq!(
        (method.as_str(), path.split('?').next()),
        ("POST", Some(SECRETS))
    );
    assert_eq!(body["type"], "kubernetes.io/tls");
    assert_eq!(body["metadata"]["name"], "kennel-peer-ca");
    assert_eq!(body["metadata"]["namespace"], "kennel-system");
    assert_eq!(body["immutable"], true);
    // What was stored is the CA returned, loadable by the next node.
    let stored: Secret = serde_json::from_value(body).expect("a Secret");
    let data = stored.data.expect("data");
    assert_eq!(data[TLS_CRT].0, ca.cert_pem().as_bytes());
    let loaded = ClusterCa::from_secret_data(&data).expect("loadable");
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    // And it signs node certificates.
    ca.issue_node("node-a").expect("a node certificate");
}

#[tokio::test]
async fn the_race_is_lost_to_the_other_nodes_ca() {
    let theirs = ClusterCa::generate().expect("CA");
    let script = vec![
        not_found("GET", SECRET, "secret"),
        already_exists(),
        expect("GET", SECRET, None, secret_of(&theirs)),
    ];
    let ca = scripted(
        script,
        |client| async move { load_or_create_ca(&client).await },
    )
    .await
    .expect("their CA");
    assert_eq!(ca.cert_pem(), theirs.cert_pem());
}

#[tokio::test]
async fn an_existing_ca_is_loaded_and_never_written() {
    let existing = ClusterCa::generate().expect("CA");
    // The script ends after the GET: any write would be an unexpected request.
    let script = vec![expect("GET", SECRET, None, secret_of(&existing))];
    let ca = scripted(
        script,
        |client| async move { load_or_create_ca(&client).await },
    )
    .await
    .expect("the existing CA");
    assert_eq!(ca.cert_pem(), existing.cert_pem());
}

#[tokio::test]
async fn a_corrupt_ca_is_an_error_and_left_alone() {
    let mut corrupt = secret_of(&ClusterCa::generate().expect("CA"));
    corrupt["data"][TLS_CRT] = json!("bm90IGEgY2VydGlmaWNhdGU="); // "not a certificate"
    let script = vec![expect("GET", SECRET, None, corrupt)];
    let err = scripted(
        script,
        |client| async move { load_or_create_ca(&client).await },
    )
    .await
    .expect_err("a corrupt CA");
    let text = format!("{err:#}");
    assert!(
        text.contains("kennel-system/kennel-peer-ca holds no usable peer CA"),
        "{text}"
    );
    assert!(text.contains(TLS_CRT), "{text}");

    let empty = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kennel-peer-ca", "namespace": "kennel-system"}});
    let script = vec![expect("GET", SECRET, None, empty)];
    let err = scripted(
        script,
        |client| async move { load_or_create_ca(&client).await },
    )
    .await
    .expect_err("an empty Secret");
    assert!(format!("{err:#}").contains("no usable peer CA"), "{err:#}");
}

#[tokio::test]
async fn api_failures_create_nothing() {
    let script = vec![failure("GET", SECRET, StatusCode::INTERNAL_SERVER_ERROR)];
    let err = scripted(
        script,
        |client| async move { load_or_create_ca(&client).await },
    )
    .await
    .expect_err("an unreadable Secret");
    assert!(format!("{err:#}").contains("reading Secret"), "{err:#}");

    let script = vec![
        not_found("GET", SECRET, "secret"),
        failure("POST", SECRETS, StatusCode::FORBIDDEN),
    ];
    let err = scripted(
        script,
        |client| async move { load_or_create_ca(&client).await },
    )
    .await
    .expect_err("a refused create");
    assert!(format!("{err:#}").contains("creating Secret"), "{err:#}");
}
