//! The API permissions the retention controller uses, kept next to the code that uses them.
//!
//! `deploy/base/retention-rbac.yaml` must grant exactly these; a test compares the two, and the
//! mock-API tests check every request they see against this list.

/// (API group, resource, verbs) granted cluster-wide by the `kennel-retention` ClusterRole.
pub const CLUSTER_RULES: &[(&str, &str, &[&str])] = &[
    // Watched; one uncached GET before each batch of writes.
    ("apps", "statefulsets", &["get", "list", "watch"]),
    // Setting blockOwnerDeletion on a ref to a set needs update on its finalizers subresource.
    ("apps", "statefulsets/finalizers", &["update"]),
    // GET: a pod is read uncached before a migration replaces its claims.
    ("", "pods", &["get", "list", "watch", "delete"]),
    ("", "pods/finalizers", &["update"]),
    // create: a migration's staging claim, restored on the target node; get: a claim read
    // uncached before a migration is undone.
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // A migration's snapshot of the claim it moves.
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        &["list", "create", "delete"],
    ),
    (
        "",
        "persistentvolumes",
        &["list", "watch", "patch", "delete"],
    ),
    // Uncached GET confirms a node is gone or out of service.
    ("", "nodes", &["get", "list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// (API group, resource, verbs) granted in the controller's own namespace (leader election).
pub const NAMESPACE_RULES: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];

/// (API group, resource, verbs) of the `kennel-orphans` ClusterRole: the node
/// DaemonSet's `kennel orphans` container.
pub const ORPHAN_RULES: &[(&str, &str, &[&str])] = &[
    ("", "persistentvolumes", &["list"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// Whether `rules` grant `verb` on `group`/`resource`.
pub fn grants(rules: &[(&str, &str, &[&str])], group: &str, resource: &str, verb: &str) -> bool {
    rules
        .iter()
        .any(|(g, r, verbs)| *g == group && *r == resource && verbs.contains(&verb))
}

/// Whether `verb` on `group`/`resource` is in one of the rule lists.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    CLUSTER_RULES
        .iter()
        .chain(NAMESPACE_RULES)
        .any(|(g, r, verbs)| *g == group && *r == resource && verbs.contains(&verb))
}

/// The RBAC (group, resource, verb) of an HTTP request to the API server, for tests.
pub fn classify(method: &str, path: &str) -> Option<(String, String, String)> {
    let path = path.split('?').next()?;
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some((group.to_string(), resource, verb.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests() {
        let c = |m, p| classify(m, p).map(|(g, r, v)| format!("{g}/{r}/{v}"));
        assert_eq!(
            c(
                "PATCH",
                "/api/v1/namespaces/default/persistentvolumeclaims/data-web-1?"
            ),
            Some("/persistentvolumeclaims/patch".into())
        );
        assert_eq!(c("GET", "/api/v1/nodes/n1"), Some("/nodes/get".into()));
        assert_eq!(
            c("POST", "/apis/events.k8s.io/v1/namespaces/default/events?"),
            Some("events.k8s.io/events/create".into())
        );
        assert_eq!(
            c("GET", "/apis/apps/v1/namespaces/default/statefulsets/web"),
            Some("apps/statefulsets/get".into())
        );
        assert!(allows("", "pods", "delete"));
        assert!(!allows("", "pods", "create"));
    }
}
