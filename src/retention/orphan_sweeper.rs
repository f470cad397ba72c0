//! `kennel orphans`: the node-local half of orphan accounting. It runs beside
//! the driver in the node DaemonSet, lists the node's volumes over the CSI
//! socket and the cluster's PersistentVolumes, counts orphans in metrics,
//! reports them as Events and, only when asked, deletes orphans that stayed
//! orphaned for a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume};
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use tracing::{info, warn};

use super::orphans::{self, BackendVolume, OrphanClock};
use super::retention_metrics::Metrics;
use crate::csi::client::CsiClient;
use crate::csi::pb;
use crate::model::spec::{PARAM_PVC_NAME, PARAM_PVC_NAMESPACE};
use humantime::parse_duration;

#[derive(clap::Args, Debug, Clone)]
pub struct OrphanArgs {
    /// CSI socket of this node's driver.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name (the driver's node id).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[arg(long, default_value = "kennel.csi.dev")]
    pub driver_name: String,
    /// How often to compare the node's volumes with the cluster's PVs.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub interval: Duration,
    /// Delete volumes that have had no PV for this long. Off unless set.
    #[arg(long, value_parser = parse_duration)]
    pub delete_after: Option<Duration>,
    /// Serve Prometheus metrics here (e.g. 0.0.0.0:9103).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

pub async fn run(args: OrphanArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("building a Kubernetes client")?;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.metrics_addr {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics_endpoint::serve(addr, m).await {
                warn!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }
    let mut sweeper = Sweeper::new(client, args.clone(), metrics);
    let mut stop = std::pin::pin!(crate::shutdown::shutdown_signal());
    loop {
        if let Err(e) = sweeper.pass().await {
            warn!(error = %format!("{e:#}"), "orphan pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

pub struct Sweeper {
    client: Client,
    recorder: Recorder,
    args: OrphanArgs,
    metrics: Arc<Metrics>,
    clock: OrphanClock,
    /// Orphans already reported, so each gets one event, not one per pass.
    reported: std::collections::BTreeSet<String>,
}

impl Sweeper {
    pub fn new(client: Client, args: OrphanArgs, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: "kennel-orphans".into(),
            instance: Some(args.node_name.clone()),
        };
        Sweeper {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            args,
            metrics,
            clock: OrphanClock::default(),
            reported: Default::default(),
        }
    }

    /// One comparison of the node's volumes with the cluster's PVs.
    pub async fn pass(&mut self) -> anyhow::Result<orphans::OrphanReport> {
        let mut csi = CsiClient::connect(&self.args.endpoint).await?;
        let volumes = list_volumes(&mut csi).await?;
        let pvs = Api::<PersistentVolume>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .context("listing PersistentVolumes")?
            .items;
        let report = orphans::plan(
            &volumes,
            &pvs,
            &self.args.driver_name,
            &self.args.node_name,
            &mut self.clock,
            Instant::now(),
            self.args.delete_after,
        );
        self.metrics.orphan_volumes.set(report.orphans.len() as i64);
        self.metrics
            .missing_volumes
            .set(report.missing.len() as i64);
        info!(
            volumes = volumes.len(),
            orphans = report.orphans.len(),
            missing = report.missing.len(),
            "orphan pass"
        );
        self.reported
            .retain(|id| report.orphans.iter().any(|o| &o.volume_id == id));
        for orphan in &report.orphans {
            if self.reported.insert(orphan.volume_id.clone()) {
                let claim = orphan.claim.as_deref().unwrap_or("an unrecorded claim");
                let note = format!(
                    "volume {} ({} bytes, made for {claim}) has no PersistentVolume",
                    orphan.volume_id, orphan.capacity_bytes
                );
                self.event(self.node_ref(), "OrphanVolume", note, true)
                    .await;
            }
        }
        for pv in &report.missing {
            let note = format!("the volume of {pv} is not on node {}", self.args.node_name);
            self.event(pv_ref(pv), "VolumeMissing", note, true).await;
        }
        for id in &report.delete {
            csi.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("deleting orphaned volume {id}"))?;
            self.metrics.action("orphan_volume_delete");
            let note =
                format!("deleted volume {id}: it had no PersistentVolume for the grace period");
            self.event(self.node_ref(), "OrphanVolumeDeleted", note, false)
                .await;
        }
        Ok(report)
    }

    fn node_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.args.node_name.clone()),
            ..Default::default()
        }
    }

    async fn event(&self, regarding: ObjectReference, reason: &str, note: String, warning: bool) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &regarding).await {
            warn!(reason, error = %e, "could not publish event");
        }
    }
}

fn pv_ref(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolume".into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Every volume of the node's driver, all pages.
async fn list_volumes(csi: &mut CsiClient) -> anyhow::Result<Vec<BackendVolume>> {
    let mut volumes = Vec::new();
    let mut token = String::new();
    loop {
        let page = csi
            .controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 256,
                starting_token: token,
            })
            .await
            .context("ListVolumes")?
            .into_inner();
        for entry in page.entries {
            let Some(v) = entry.volume else { continue };
            let claim = match (
                v.volume_context.get(PARAM_PVC_NAMESPACE),
                v.volume_context.get(PARAM_PVC_NAME),
            ) {
                (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
                _ => None,
            };
            volumes.push(BackendVolume {
                volume_id: v.volume_id,
                claim,
                capacity_bytes: v.capacity_bytes,
            });
        }
        if page.next_token.is_empty() {
            return Ok(volumes);
        }
        token = page.next_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::loop_files::Provisioning;
    use crate::driver::{DriverArgs, LocalDriver};
    use crate::retention::mock_api::{expect, serve, Exchange};
    use crate::retention::rbac;
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn orphan_event(reason: &str) -> Exchange {
        Exchange {
            method: "POST",
            path: "/apis/events.k8s.io/v1/namespaces/default/events".into(),
            body: Some(json!({"reason": reason, "reportingController": "kennel-orphans"})),
            status: StatusCode::OK,
            reply: None,
            note_names: None,
        }
    }

    /// Every request must be granted by the `kennel-orphans` ClusterRole.
    fn node_rbac(method: &str, path: &str) -> bool {
        let (group, resource, verb) = rbac::classify(method, path).expect("API request");
        rbac::grants(rbac::ORPHAN_RULES, &group, &resource, &verb)
    }

    /// A real driver (sparse images: no root needed) on a temporary socket.
    async fn driver(dir: &std::path::Path) -> (String, LocalDriver) {
        let mut args = DriverArgs::in_dir(dir, "node-1", 1 << 30, Provisioning::Sparse);
        // Controller calls only: no mount, so no shared kubelet directory (and no root) needed.
        args.require_shared_kubelet_dir = false;
        let local = LocalDriver::start(&args).await.expect("driver");
        (args.endpoint, local)
    }

    /// Create a 1 MiB Block volume named `name` with `parameters`.
    async fn create(
        csi: &mut CsiClient,
        name: &str,
        parameters: BTreeMap<String, String>,
    ) -> pb::Volume {
        let block = pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Block(
                pb::volume_capability::BlockVolume {},
            )),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        };
        csi.controller
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block],
                parameters,
                ..Default::default()
            })
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
    }

    #[tokio::test]
    async fn orphan_is_reported_once_then_deleted_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let (endpoint, _driver) = driver(dir.path()).await;
        let mut csi = CsiClient::connect(&endpoint).await.unwrap();
        let claim = [
            (PARAM_PVC_NAME.to_owned(), "www-web-0".to_owned()),
            (PARAM_PVC_NAMESPACE.to_owned(), "shop".to_owned()),
        ];
        let volume = create(&mut csi, "pvc-1234", claim.into()).await;

        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let args = OrphanArgs {
            endpoint,
            node_name: "node-1".into(),
            driver_name: "kennel.csi.dev".into(),
            interval: Duration::from_secs(60),
            delete_after: Some(Duration::ZERO),
            metrics_addr: None,
        };
        let metrics = Arc::new(Metrics::default());
        let mut sweeper = Sweeper::new(client, args, metrics.clone());
        let empty = json!({"kind": "PersistentVolumeList", "apiVersion": "v1", "metadata": {}, "items": []});
        let script = vec![
            expect("GET", "/api/v1/persistentvolumes", None, empty),
            orphan_event("OrphanVolume"),
            orphan_event("OrphanVolumeDeleted"),
        ];
        let server = tokio::spawn(serve(handle, script, node_rbac));
        let report = tokio::time::timeout(Duration::from_secs(10), sweeper.pass())
            .await
            .expect("pass in time")
            .expect("pass");
        server.await.expect("every request as scripted");

        assert_eq!(report.orphans.len(), 1);
        assert_eq!(report.orphans[0].volume_id, volume.volume_id);
        assert_eq!(report.orphans[0].claim.as_deref(), Some("shop/www-web-0"));
        assert_eq!(report.delete, vec![volume.volume_id.clone()]);
        assert_eq!(metrics.orphan_volumes.get(), 1);
        let left = csi
            .controller
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            left.entries.is_empty(),
            "the orphan was deleted through the driver"
        );
    }

    #[tokio::test]
    async fn a_volume_with_its_pv_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (endpoint, _driver) = driver(dir.path()).await;
        let mut csi = CsiClient::connect(&endpoint).await.unwrap();
        let volume = create(&mut csi, "pvc-5678", BTreeMap::new()).await;
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let args = OrphanArgs {
            endpoint,
            node_name: "node-1".into(),
            driver_name: "kennel.csi.dev".into(),
            interval: Duration::from_secs(60),
            delete_after: Some(Duration::ZERO),
            metrics_addr: None,
        };
        let mut sweeper = Sweeper::new(
            Client::new(service, "default"),
            args,
            Arc::new(Metrics::default()),
        );
        let pvs = json!({"kind": "PersistentVolumeList", "apiVersion": "v1", "metadata": {}, "items": [{
            "metadata": {"name": "pvc-5678"},
            "spec": {"csi": {"driver": "kennel.csi.dev", "volumeHandle": volume.volume_id,
                             "volumeAttributes": {"kennel.csi.dev/node": "node-1"}}},
            "status": {"phase": "Bound"}
        }]});
        let server = tokio::spawn(serve(
            handle,
            vec![expect("GET", "/api/v1/persistentvolumes", None, pvs)],
            node_rbac,
        ));
        let report = sweeper.pass().await.expect("pass");
        server.await.expect("only the list");
        assert_eq!(report, orphans::OrphanReport::default());
    }
}
