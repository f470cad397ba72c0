//! What the cluster says about a volume this node does not hold: its PersistentVolume, the
//! node it is pinned to, and the expansion requests on it ([`crate::csi::expansion`]). Read
//! uncached from the API server (the calls that need it are rare), written only as annotations
//! of Kennel's own PVs, with the driver's own ServiceAccount (`deploy/base/node-rbac.yaml`,
//! ClusterRole `kennel-driver`).

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;

use crate::csi::expansion::{
    EXPANDED_TO_ANNOTATION, EXPAND_ASKED_AT_ANNOTATION, EXPAND_FAILED_ANNOTATION,
    EXPAND_TO_ANNOTATION,
};
use crate::error::{Error, Result};
use crate::topology::pinned_node;

/// What the reads below need, as RBAC rules (group, resource, verbs): `deploy/`'s ClusterRole
/// `kennel-driver` grants exactly these.
pub const DRIVER_RULES: &[(&str, &str, &[&str])] =
    &[("", "persistentvolumes", &["get", "list", "watch", "patch"])];

/// A Kennel volume as its PV describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedVolume {
    pub pv: String,
    /// The node its PV is pinned to.
    pub node: Option<String>,
    /// The size another node was asked to grow it to.
    pub expand_to: Option<u64>,
    /// The size its holder reports it grown to.
    pub expanded_to: Option<u64>,
    /// When the last request was made: what tells one request from the next.
    pub asked_at: Option<String>,
    /// The holder's refusal of a request: that request's `asked_at` and the error.
    pub failed: Option<(String, String)>,
}

/// The API server, as the driver reads it.
#[derive(Clone)]
pub struct ClusterView {
    client: Client,
    driver_name: String,
}

fn api_error(what: &str, e: kube::Error) -> Error {
    Error::Unavailable(format!("{what}: {e}"))
}

impl ClusterView {
    /// In-cluster configuration, or `KUBECONFIG`.
    pub async fn connect(driver_name: &str) -> Result<ClusterView> {
        let client = Client::try_default()
            .await
            .map_err(|e| api_error("connect to the API server", e))?;
        Ok(ClusterView {
            client,
            driver_name: driver_name.to_owned(),
        })
    }

    /// The client, for the other uses of the API server (the peer channel).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The PV of this driver whose volume handle is `handle`, if any.
    pub async fn volume(&self, handle: &str) -> Result<Option<PlacedVolume>> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let list = pvs
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error("list PersistentVolumes", e))?;
        Ok(list
            .items
            .iter()
            .find(|pv| {
                pv.spec
                    .as_ref()
                    .and_then(|s| s.csi.as_ref())
                    .is_some_and(|c| c.driver == self.driver_name && c.volume_handle == handle)
            })
            .map(placed))
    }

    /// The same PV read again by name (`None` once it is gone).
    pub async fn volume_named(&self, pv: &str) -> Result<Option<PlacedVolume>> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        pvs.get_opt(pv)
            .await
            .map(|found| found.as_ref().map(placed))
            .map_err(|e| api_error("get PersistentVolume", e))
    }

    /// Every PersistentVolume, for a watch.
    pub fn volumes(&self) -> Api<PersistentVolume> {
        Api::all(self.client.clone())
    }

    /// Set (or, with `None`, remove) annotations of PV `pv` (a merge patch: nothing else
    /// changes).
    pub async fn annotate_volume(&self, pv: &str, notes: &[(&str, Option<&str>)]) -> Result<()> {
        let notes: serde_json::Map<String, serde_json::Value> = notes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
            .collect();
        let patch = serde_json::json!({"metadata": {"annotations": notes}});
        self.volumes()
            .patch(pv, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|e| api_error("annotate PersistentVolume", e))
    }
}

fn annotation<'a>(pv: &'a PersistentVolume, key: &str) -> Option<&'a str> {
    pv.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// A whole number of bytes, as the annotations hold them.
fn annotation_bytes(pv: &PersistentVolume, key: &str) -> Option<u64> {
    annotation(pv, key)?.parse().ok()
}

/// The refusal annotation: `{"asked_at": …, "error": …}`.
fn refusal(pv: &PersistentVolume) -> Option<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(annotation(pv, EXPAND_FAILED_ANNOTATION)?).ok()?;
    Some((
        v["asked_at"].as_str()?.to_owned(),
        v["error"].as_str()?.to_owned(),
    ))
}

pub(crate) fn placed(pv: &PersistentVolume) -> PlacedVolume {
    PlacedVolume {
        pv: pv.metadata.name.clone().unwrap_or_default(),
        node: pinned_node(pv),
        expand_to: annotation_bytes(pv, EXPAND_TO_ANNOTATION),
        expanded_to: annotation_bytes(pv, EXPANDED_TO_ANNOTATION),
        asked_at: annotation(pv, EXPAND_ASKED_AT_ANNOTATION).map(str::to_owned),
        failed: refusal(pv),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pv_tells_its_node_and_the_expansion_asked_and_done() {
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-1", "annotations": {
                EXPAND_TO_ANNOTATION: "419430400",
                EXPANDED_TO_ANNOTATION: "not a number",
                EXPAND_ASKED_AT_ANNOTATION: "t1",
                EXPAND_FAILED_ANNOTATION: r#"{"asked_at": "t0", "error": "pool full"}"#,
            }},
            "spec": {
                "csi": {"driver": "kennel.csi.dev", "volumeHandle": "kv-x"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": crate::topology::TOPOLOGY_KEY, "operator": "In", "values": ["node-b"]}
                ]}]}},
            },
        }))
        .unwrap();
        assert_eq!(
            placed(&pv),
            PlacedVolume {
                pv: "pvc-1".into(),
                node: Some("node-b".into()),
                expand_to: Some(400 << 20),
                expanded_to: None,
                asked_at: Some("t1".into()),
                failed: Some(("t0".into(), "pool full".into())),
            }
        );
    }
}
