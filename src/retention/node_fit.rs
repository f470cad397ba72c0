//! Whether a pod may run on a node by its own rules — `nodeSelector` and the required node
//! affinity — so that a claim is never moved to a node its pod refuses. Taints are not judged
//! here: a migration only considers nodes without NoSchedule or NoExecute taints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, Pod};

/// Whether `pod` accepts the node `name` with `labels`.
pub fn pod_fits(pod: &Pod, name: &str, labels: &BTreeMap<String, String>) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    // Terms are ORed, the requirements of a term ANDed; no terms at all matches nothing.
    let affinity_ok = required.is_none_or(|r| {
        r.node_selector_terms.iter().any(|term| {
            let exprs = term.match_expressions.iter().flatten();
            let fields = term.match_fields.iter().flatten();
            let has_any = exprs.clone().next().is_some() || fields.clone().next().is_some();
            has_any
                && exprs
                    .clone()
                    .all(|e| requirement(e, labels.get(&e.key).map(String::as_str)))
                && fields
                    .clone()
                    .all(|f| f.key == "metadata.name" && requirement(f, Some(name)))
        })
    });
    selector_ok && affinity_ok
}

fn requirement(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match (r.operator.as_str(), value) {
        ("In", Some(v)) => values.iter().any(|x| x == v),
        ("NotIn", Some(v)) => !values.iter().any(|x| x == v),
        ("NotIn", None) | ("DoesNotExist", None) | ("Exists", Some(_)) => true,
        ("Gt", Some(v)) => {
            matches!((number(v), values.first().and_then(|x| number(x))), (Some(a), Some(b)) if a > b)
        }
        ("Lt", Some(v)) => {
            matches!((number(v), values.first().and_then(|x| number(x))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn required(terms: serde_json::Value) -> Pod {
        pod(json!({"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms},
        }}}))
    }

    #[test]
    fn node_selector_needs_every_label() {
        let p = pod(json!({"containers": [], "nodeSelector": {"disk": "ssd", "zone": "a"}}));
        assert!(pod_fits(
            &p,
            "n",
            &labels(&[("disk", "ssd"), ("zone", "a"), ("x", "y")])
        ));
        assert!(!pod_fits(&p, "n", &labels(&[("disk", "ssd")])));
        assert!(pod_fits(&pod(json!({"containers": []})), "n", &labels(&[])));
    }

    #[test]
    fn required_affinity_ors_terms_and_ands_requirements() {
        let p = required(json!([
            {"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a", "b"]},
                {"key": "spot", "operator": "DoesNotExist"},
            ]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
        ]));
        assert!(pod_fits(&p, "n", &labels(&[("zone", "b")])));
        assert!(!pod_fits(&p, "n", &labels(&[("zone", "b"), ("spot", "1")])));
        assert!(!pod_fits(&p, "n", &labels(&[("zone", "c")])));
        assert!(pod_fits(&p, "special", &labels(&[])));
        let numbers = required(json!([{"matchExpressions": [
            {"key": "cores", "operator": "Gt", "values": ["4"]},
            {"key": "arch", "operator": "NotIn", "values": ["arm64"]},
        ]}]));
        assert!(pod_fits(&numbers, "n", &labels(&[("cores", "8")])));
        assert!(!pod_fits(&numbers, "n", &labels(&[("cores", "2")])));
        assert!(!pod_fits(
            &numbers,
            "n",
            &labels(&[("cores", "8"), ("arch", "arm64")])
        ));
        assert!(
            !pod_fits(&required(json!([])), "n", &labels(&[])),
            "no term matches nothing"
        );
    }
}
