//! The grant check: a node may read a snapshot only to restore it into a claim the scheduler
//! placed on that node, whose data source is a VolumeSnapshot bound to this very snapshot on
//! this node. Each link is read from the API server at the time of the request.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::Client;
use serde_json::Value;

use crate::model::id::SnapshotId;
use crate::peer::name::NodeName;
use crate::peer::server::Grants;

/// Set by the scheduler on a claim whose volume waits for its first consumer: the node the
/// volume will be made on.
pub const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";
const SNAPSHOT_GROUP: &str = "snapshot.storage.k8s.io";
const SNAPSHOT_VERSION: &str = "v1";

/// Why a grant was refused: which link of the chain is missing or wrong.
type Refusal = String;

/// [`Grants`] read from the cluster: claim → VolumeSnapshot → VolumeSnapshotContent → handle.
#[derive(Clone)]
pub struct KubeGrants {
    client: Client,
    this_node: NodeName,
    driver_name: String,
}

fn snapshot_kind(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(SNAPSHOT_GROUP, SNAPSHOT_VERSION, kind),
        plural,
    )
}

/// A string at `path` in an untyped object's body.
fn field<'a>(obj: &'a DynamicObject, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(&obj.data, |v, key| v.get(key))
        .and_then(Value::as_str)
}

/// The VolumeSnapshot a claim is restored from, as (namespace, name): `dataSourceRef`, which
/// supersedes `dataSource` when both are set.
fn snapshot_source(claim: &PersistentVolumeClaim, claim_ns: &str) -> Result<String, Refusal> {
    let spec = claim.spec.as_ref().ok_or("the claim has no spec")?;
    let (group, kind, name, namespace) = match (&spec.data_source_ref, &spec.data_source) {
        (Some(r), _) => (&r.api_group, &r.kind, &r.name, r.namespace.as_deref()),
        (None, Some(s)) => (&s.api_group, &s.kind, &s.name, None),
        (None, None) => return Err("the claim has no data source".into()),
    };
    if group.as_deref() != Some(SNAPSHOT_GROUP) || kind != "VolumeSnapshot" {
        return Err(format!(
            "the claim's data source is a {kind} of group {:?}, not a VolumeSnapshot",
            group.as_deref().unwrap_or("")
        ));
    }
    // A cross-namespace source needs a ReferenceGrant the driver does not check: refused.
    if namespace.is_some_and(|ns| ns != claim_ns) {
        return Err(format!(
            "the claim's data source is in namespace {:?}, not the claim's",
            namespace.unwrap_or_default()
        ));
    }
    Ok(name.clone())
}

impl KubeGrants {
    /// Grants checked by the driver `driver_name` on `this_node` (the node that serves).
    pub fn new(client: Client, this_node: NodeName, driver_name: &str) -> Self {
        KubeGrants {
            client,
            this_node,
            driver_name: driver_name.to_owned(),
        }
    }

    /// Whether a snapshot handle names `snapshot` on this node: `<id>@<this node>` as
    /// `crate::csi::snapshot_handle::handle` makes it, or a bare `<id>`, which older drivers
    /// (and nodes whose name makes the ID too long) hand out for their own snapshots.
    fn names_this_snapshot(&self, handle: &str, snapshot: &SnapshotId) -> bool {
        match handle.split_once('@') {
            None => handle == snapshot.as_str(),
            Some((id, node)) => id == snapshot.as_str() && node == self.this_node.as_str(),
        }
    }

    async fn check(
        &self,
        requester: &NodeName,
        snapshot: &SnapshotId,
        ns: &str,
        name: &str,
    ) -> anyhow::Result<Result<(), Refusal>> {
        let source =
            match claim_source(&self.client, &self.driver_name, ns, name, requester).await? {
                Ok(source) => source,
                Err(refusal) => return Ok(Err(refusal)),
            };
        if !self.names_this_snapshot(&source.handle, snapshot) {
            return Ok(Err(format!(
                "the claim restores snapshot {:?}, not this one on this node",
                source.handle
            )));
        }
        Ok(Ok(()))
    }
}

/// What a claim being restored from a snapshot says, each link read from the API server and
/// checked to hold: its VolumeSnapshot's bound content (of this driver, bound back to that
/// VolumeSnapshot) with the snapshot's handle and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimSource {
    pub handle: String,
    /// The content's `status.restoreSize`, if the snapshotter reported one.
    pub restore_size: Option<u64>,
}

/// The snapshot claim `ns/name`, placed by the scheduler on `node`, is being restored from;
/// `Ok(Err(why))` when a link is missing or wrong.
pub async fn claim_source(
    client: &Client,
    driver_name: &str,
    ns: &str,
    name: &str,
    node: &NodeName,
) -> anyhow::Result<Result<ClaimSource, Refusal>> {
    {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let Some(claim) = claims
            .get_opt(name)
            .await
            .with_context(|| format!("reading claim {ns}/{name}"))?
        else {
            return Ok(Err("the claim does not exist".into()));
        };
        if claim.metadata.deletion_timestamp.is_some() {
            return Ok(Err("the claim is being deleted".into()));
        }
        let selected = claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTED_NODE_ANNOTATION));
        if selected.map(String::as_str) != Some(node.as_str()) {
            return Ok(Err(format!(
                "the claim's selected node is {selected:?}, not {node}"
            )));
        }
        let source = match snapshot_source(&claim, ns) {
            Ok(source) => source,
            Err(refusal) => return Ok(Err(refusal)),
        };

        let snapshots: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            ns,
            &snapshot_kind("VolumeSnapshot", "volumesnapshots"),
        );
        let Some(vs) = snapshots
            .get_opt(&source)
            .await
            .with_context(|| format!("reading VolumeSnapshot {ns}/{source}"))?
        else {
            return Ok(Err(format!("VolumeSnapshot {source} does not exist")));
        };
        let Some(content_name) = field(&vs, &["status", "boundVolumeSnapshotContentName"]) else {
            return Ok(Err(format!(
                "VolumeSnapshot {source} is bound to no content"
            )));
        };

        let contents: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &snapshot_kind("VolumeSnapshotContent", "volumesnapshotcontents"),
        );
        let Some(content) = contents
            .get_opt(content_name)
            .await
            .with_context(|| format!("reading VolumeSnapshotContent {content_name}"))?
        else {
            return Ok(Err(format!(
                "VolumeSnapshotContent {content_name} does not exist"
            )));
        };
        // The binding goes both ways: a content bound to another VolumeSnapshot is not this one's.
        let back = (
            field(&content, &["spec", "volumeSnapshotRef", "namespace"]),
            field(&content, &["spec", "volumeSnapshotRef", "name"]),
        );
        if back != (Some(ns), Some(source.as_str())) {
            return Ok(Err(format!(
                "VolumeSnapshotContent {content_name} belongs to VolumeSnapshot {back:?}"
            )));
        }
        let driver = field(&content, &["spec", "driver"]);
        if driver != Some(driver_name) {
            return Ok(Err(format!(
                "VolumeSnapshotContent {content_name} is of driver {driver:?}"
            )));
        }
        let Some(handle) = field(&content, &["status", "snapshotHandle"]) else {
            return Ok(Err(format!(
                "VolumeSnapshotContent {content_name} has no snapshot handle yet"
            )));
        };
        let restore_size = content
            .data
            .pointer("/status/restoreSize")
            .and_then(Value::as_u64);
        Ok(Ok(ClaimSource {
            handle: handle.to_owned(),
            restore_size,
        }))
    }
}

impl Grants for KubeGrants {
    async fn granted(
        &self,
        requester: &NodeName,
        snapshot: &SnapshotId,
        claim_namespace: &str,
        claim_name: &str,
    ) -> anyhow::Result<bool> {
        let verdict = self
            .check(requester, snapshot, claim_namespace, claim_name)
            .await?;
        if let Err(refusal) = &verdict {
            tracing::debug!(
                node = %requester, snapshot = %snapshot,
                claim = %format!("{claim_namespace}/{claim_name}"),
                "peer read not granted: {refusal}"
            );
        }
        Ok(verdict.is_ok())
    }
}
