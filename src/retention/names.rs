//! Names and ordinals of a StatefulSet's pods and claims.
//!
//! Names are always computed forward from (template, set, ordinal). Parsing them backwards is
//! ambiguous: template `data-web` with set `x` and template `data` with set `web-x` both give
//! `data-web-x-0`.

use k8s_openapi::api::apps::v1::StatefulSet;

/// Name of the pod with `ordinal` in `set`.
pub fn pod_name(set: &str, ordinal: u32) -> String {
    format!("{set}-{ordinal}")
}

/// Name of the claim made from `template` for the pod with `ordinal` in `set`.
pub fn claim_name(template: &str, set: &str, ordinal: u32) -> String {
    format!("{template}-{set}-{ordinal}")
}

/// The ordinal `o` for which `make(o) == name`, if there is one.
///
/// `make` is one of the forward name functions; the candidate ordinal is only accepted when
/// formatting it again reproduces `name` exactly (no leading zeros, no signs).
fn ordinal_matching(name: &str, prefix: &str, make: impl Fn(u32) -> String) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    let ordinal: u32 = digits.parse().ok()?;
    (make(ordinal) == name).then_some(ordinal)
}

/// The ordinal of the pod called `name` in `set`, if `name` is one of its pod names.
pub fn pod_ordinal(set: &str, name: &str) -> Option<u32> {
    ordinal_matching(name, &format!("{set}-"), |o| pod_name(set, o))
}

/// The ordinal of the claim called `name` made from `template` in `set`, if any.
pub fn claim_ordinal(template: &str, set: &str, name: &str) -> Option<u32> {
    ordinal_matching(name, &format!("{template}-{set}-"), |o| {
        claim_name(template, set, o)
    })
}

/// Names of the set's `volumeClaimTemplates`, in spec order.
pub fn templates(set: &StatefulSet) -> Vec<String> {
    set.spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .map(|ts| ts.iter().filter_map(|t| t.metadata.name.clone()).collect())
        .unwrap_or_default()
}

/// The template and ordinal of claim `name` in `set`, trying every template.
pub fn claim_identity(set: &StatefulSet, name: &str) -> Option<(String, u32)> {
    let set_name = set.metadata.name.as_deref()?;
    templates(set)
        .into_iter()
        .find_map(|t| claim_ordinal(&t, set_name, name).map(|o| (t, o)))
}

/// Ordinals the set wants to exist: `start ..= start + replicas - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrdinalRange {
    start: u64,
    end: u64, // exclusive
}

impl OrdinalRange {
    /// The range of `set`; `spec.ordinals.start` defaults to 0 and `spec.replicas` to 1, as the
    /// API server defaults them.
    pub fn of(set: &StatefulSet) -> Self {
        let spec = set.spec.as_ref();
        let start = spec
            .and_then(|s| s.ordinals.as_ref())
            .and_then(|o| o.start)
            .unwrap_or(0)
            .max(0) as u64;
        let replicas = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as u64;
        Self {
            start,
            end: start + replicas,
        }
    }

    pub fn contains(&self, ordinal: u32) -> bool {
        (self.start..self.end).contains(&u64::from(ordinal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetOrdinals, StatefulSetSpec};

    #[test]
    fn names_are_computed_forward() {
        assert_eq!(pod_name("web", 2), "web-2");
        assert_eq!(claim_name("data", "web", 2), "data-web-2");
    }

    #[test]
    fn colliding_names_resolve_only_for_the_right_pair() {
        // `data-web-x-0` is claim 0 of (data-web, x) and of (data, web-x); each pair recomputes
        // its own name, so each finds exactly its own ordinal.
        assert_eq!(claim_ordinal("data-web", "x", "data-web-x-0"), Some(0));
        assert_eq!(claim_ordinal("data", "web-x", "data-web-x-0"), Some(0));
        assert_eq!(claim_ordinal("data", "web", "data-web-x-0"), None);
        assert_eq!(claim_ordinal("data", "web", "data-web-01"), None);
        assert_eq!(claim_ordinal("data", "web", "data-web--1"), None);
        assert_eq!(claim_ordinal("data", "web", "data-web-"), None);
        assert_eq!(pod_ordinal("web", "web-10"), Some(10));
        assert_eq!(pod_ordinal("web", "web-x-1"), None);
    }

    #[test]
    fn range_honours_start_and_replicas() {
        let mut set = StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = OrdinalRange::of(&set);
        assert!(r.contains(0) && r.contains(2) && !r.contains(3));
        set.spec.as_mut().unwrap().ordinals = Some(StatefulSetOrdinals { start: Some(5) });
        let r = OrdinalRange::of(&set);
        assert!(!r.contains(4) && r.contains(5) && r.contains(7) && !r.contains(8));
        set.spec.as_mut().unwrap().replicas = Some(0);
        assert!(!OrdinalRange::of(&set).contains(5));
        set.spec.as_mut().unwrap().replicas = None;
        assert!(OrdinalRange::of(&set).contains(5));
    }
}
