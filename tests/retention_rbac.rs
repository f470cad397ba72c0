//! deploy/base/retention-rbac.yaml grants exactly what the retention controller calls.

use std::collections::BTreeSet;

use kennel::retention::rbac::{CLUSTER_RULES, NAMESPACE_RULES};

type Grants = BTreeSet<(String, String, String)>;

/// Items of a flow sequence such as `["get", "list"]` or `[""]`.
fn flow_list(text: &str, key: &str) -> Vec<String> {
    let start = text
        .find(&format!("{key}:"))
        .unwrap_or_else(|| panic!("{key} in {text}"));
    let rest = &text[start..];
    let open = rest.find('[').expect("[");
    let close = rest.find(']').expect("]");
    rest[open + 1..close]
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty()) // `[]`; a quoted `""` is the core group
        .map(|item| item.trim_matches('"').to_string())
        .collect()
}

/// The (group, resource, verb) grants of every document of `kind`, plus its namespace.
fn grants(yaml: &str, kind: &str) -> (Grants, BTreeSet<String>) {
    let mut out = Grants::new();
    let mut namespaces = BTreeSet::new();
    for doc in yaml.split("\n---") {
        if !doc.lines().any(|l| l.trim() == format!("kind: {kind}")) {
            continue;
        }
        if let Some(ns) = doc
            .lines()
            .find_map(|l| l.trim().strip_prefix("namespace: "))
        {
            namespaces.insert(ns.to_string());
        }
        for line in doc
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("- {apiGroups"))
        {
            for group in flow_list(line, "apiGroups") {
                for resource in flow_list(line, "resources") {
                    for verb in flow_list(line, "verbs") {
                        assert!(
                            out.insert((group.clone(), resource.clone(), verb.clone())),
                            "duplicate grant {verb} {group}/{resource}"
                        );
                    }
                }
            }
        }
    }
    (out, namespaces)
}

fn expected(rules: &[(&str, &str, &[&str])]) -> Grants {
    rules
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

const YAML: &str = include_str!("../deploy/base/retention-rbac.yaml");

#[test]
fn cluster_role_grants_exactly_what_the_code_calls() {
    let (granted, _) = grants(YAML, "ClusterRole");
    assert_eq!(granted, expected(CLUSTER_RULES));
}

#[test]
fn lease_role_is_namespaced_and_exact() {
    let (granted, namespaces) = grants(YAML, "Role");
    assert_eq!(granted, expected(NAMESPACE_RULES));
    assert_eq!(namespaces, BTreeSet::from(["kennel-system".to_string()]));
}

#[test]
fn owner_reference_finalizers_are_granted() {
    let (granted, _) = grants(YAML, "ClusterRole");
    for (group, resource) in [("apps", "statefulsets/finalizers"), ("", "pods/finalizers")] {
        assert!(granted.contains(&(group.into(), resource.into(), "update".into())));
    }
    for verb in ["create", "patch"] {
        assert!(granted.contains(&("events.k8s.io".into(), "events".into(), verb.into())));
    }
}

#[test]
fn bindings_name_the_service_account() {
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let doc = YAML
            .split("\n---")
            .find(|d| d.lines().any(|l| l.trim() == format!("kind: {kind}")))
            .unwrap_or_else(|| panic!("{kind}"));
        assert!(doc.contains(
            "kind: ServiceAccount\n    name: kennel-retention\n    namespace: kennel-system"
        ));
    }
    assert!(YAML.contains(
        "kind: ServiceAccount\nmetadata:\n  name: kennel-retention\n  namespace: kennel-system"
    ));
}
