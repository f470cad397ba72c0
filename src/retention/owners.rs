//! Owner references as the StatefulSet controller writes them on claims.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// One of the two owners a claim can have under a retention policy: the set or one of its pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub name: String,
    /// `None` when the object does not exist (a pod not created yet, or already gone).
    pub uid: Option<String>,
}

impl Owner {
    pub fn set(name: &str, uid: &str) -> Self {
        Self {
            api_version: "apps/v1",
            kind: "StatefulSet",
            name: name.to_string(),
            uid: Some(uid.to_string()),
        }
    }

    pub fn pod(name: String, uid: Option<String>) -> Self {
        Self {
            api_version: "v1",
            kind: "Pod",
            name,
            uid,
        }
    }

    /// The ref names this owner's group, kind and name (whatever its UID).
    pub fn named_by(&self, r: &OwnerReference) -> bool {
        r.api_version == self.api_version && r.kind == self.kind && r.name == self.name
    }

    /// The ref points at this very object (same UID).
    pub fn is(&self, r: &OwnerReference) -> bool {
        self.uid.as_deref() == Some(r.uid.as_str())
    }

    /// The ref names this owner but another incarnation of it.
    pub fn is_stale(&self, r: &OwnerReference) -> bool {
        self.named_by(r) && !self.is(r)
    }

    /// A controller reference (`controller` and `blockOwnerDeletion` set), as
    /// `metav1.NewControllerRef` builds it. `None` when the owner does not exist.
    pub fn controller_ref(&self) -> Option<OwnerReference> {
        Some(OwnerReference {
            api_version: self.api_version.to_string(),
            kind: self.kind.to_string(),
            name: self.name.clone(),
            uid: self.uid.clone()?,
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
    }
}

pub fn is_controller(r: &OwnerReference) -> bool {
    r.controller == Some(true)
}
