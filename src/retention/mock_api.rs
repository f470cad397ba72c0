//! A scripted fake API server for tests: each request must match the next
//! expected one (method, path, body fields) and be allowed by RBAC.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::Handle;

use crate::retention::controller::REPORTER;

/// One request the controller must make next, and the answer the fake server gives.
pub struct Exchange {
    pub method: &'static str,
    pub path: String,
    /// Fields the JSON body must contain (compared exactly, key by key, at the top level).
    pub body: Option<Value>,
    pub status: StatusCode,
    /// `None`: echo the request body (what the API server does for events).
    pub reply: Option<Value>,
    /// Text the body's `note` must contain.
    pub note_names: Option<String>,
}

pub fn expect(method: &'static str, path: &str, body: Option<Value>, reply: Value) -> Exchange {
    Exchange {
        method,
        path: path.into(),
        body,
        status: StatusCode::OK,
        reply: Some(reply),
        note_names: None,
    }
}

pub fn not_found(method: &'static str, path: &str, what: &str) -> Exchange {
    Exchange {
        method,
        path: path.into(),
        body: None,
        status: StatusCode::NOT_FOUND,
        reply: Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{what} not found"), "reason": "NotFound", "code": 404
        })),
        note_names: None,
    }
}

pub fn conflict(method: &'static str, path: &str) -> Exchange {
    Exchange {
        method,
        path: path.into(),
        body: None,
        status: StatusCode::CONFLICT,
        reply: Some(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the object has been modified", "reason": "Conflict", "code": 409
        })),
        note_names: None,
    }
}

/// An event POST (a new event, not a merge into an earlier one's series) whose `reason` is
/// `reason`, about the `kind` object `name`, whose note names it.
pub fn event_about(reason: &str, kind: &str, name: &str) -> Exchange {
    Exchange {
        method: "POST",
        path: "/apis/events.k8s.io/v1/namespaces/default/events".into(),
        body: Some(json!({
            "reason": reason,
            "reportingController": REPORTER,
            "regarding": {"kind": kind, "name": name},
        })),
        status: StatusCode::OK,
        reply: None,
        note_names: Some(name.into()),
    }
}

/// Whether `actual` has `expected`: equal, or for objects every expected key with a value that
/// `contains` the expected one (objects nest; other values compare exactly).
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| contains(av, v))),
        _ => actual == expected,
    }
}

/// Serves `script` in order, asserting each request, then asserts nothing else was asked.
pub async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    script: Vec<Exchange>,
    allowed: fn(&str, &str) -> bool,
) {
    for (i, step) in script.into_iter().enumerate() {
        let (request, send) = handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("request {i} ({} {}) never came", step.method, step.path));
        let (method, path) = (
            request.method().to_string(),
            request.uri().path().to_string(),
        );
        assert_eq!(
            (method.as_str(), path.as_str()),
            (step.method, step.path.as_str()),
            "request {i}"
        );
        assert!(
            allowed(&method, &path),
            "request {i}: {method} {path} is not allowed by the RBAC rules"
        );
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        if let Some(expected) = &step.body {
            for (key, value) in expected.as_object().expect("object") {
                let actual = body.get(key);
                assert!(
                    actual.is_some_and(|a| contains(a, value)),
                    "request {i} {path}: body field {key}: want {value}, in {body}"
                );
            }
        }
        if let Some(name) = &step.note_names {
            let note = body.get("note").and_then(Value::as_str).unwrap_or_default();
            assert!(
                note.contains(name.as_str()),
                "request {i}: note {note:?} does not name {name}"
            );
        }
        let reply = step.reply.unwrap_or(body);
        send.send_response(
            Response::builder()
                .status(step.status)
                .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                .expect("response"),
        );
    }
    // Let a stray request surface before declaring victory.
    tokio::select! {
        extra = handle.next_request() => {
            if let Some((request, _)) = extra {
                panic!("unexpected request {} {}", request.method(), request.uri());
            }
        }
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
}
