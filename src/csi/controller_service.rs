//! Controller service glue.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::csi::change_log::{claim_in, Change};
use crate::csi::convert::{self, CapabilityError, RequestedSource};
use crate::csi::expansion;
use crate::csi::pb::{
    self, controller_server::Controller as ControllerRpc, controller_service_capability,
};
use crate::csi::server::Driver;
use crate::csi::snapshot_handle::{self, Located};
use crate::error::Error;
use crate::model::io_limits::IoLimits;
use crate::model::spec::{self, CreateRequest, VolumeParams};

pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { driver }
    }

    /// This node's name, which snapshot IDs carry.
    fn node(&self) -> &str {
        &self.driver.controller.identity().node_id
    }

    fn volume(&self, record: &crate::backend::VolumeRecord) -> pb::Volume {
        convert::volume(
            record,
            &self.driver.controller.identity().topology,
            self.driver.volume_context(record),
        )
    }
}

fn condition(abnormal: Option<String>) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: abnormal.is_some(),
        message: abnormal.unwrap_or_else(|| crate::csi::driver_metrics::HEALTHY.to_owned()),
    }
}

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not supported by Kennel"))
}

#[tonic::async_trait]
impl ControllerRpc for ControllerService {
    #[instrument(skip_all, fields(rpc = "CreateVolume", volume_name = %request.get_ref().name, volume_id = tracing::field::Empty))]
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let change = Change::begin("volume created").claim(claim_in(&req.parameters));
        spec::validate_name(&req.name)?;
        let capabilities = convert::capabilities(&req.volume_capabilities)?;
        let capacity = convert::capacity_range(req.capacity_range.as_ref())?;
        let asked_source = req.volume_content_source.clone();
        let source = asked_source
            .as_ref()
            .map(|s| convert::content_source(s, self.node()))
            .transpose()?;
        let mut params = VolumeParams::parse(&req.parameters)?;
        params.io_limits = IoLimits::default().apply(&req.mutable_parameters)?;
        let requisite = req
            .accessibility_requirements
            .map(|t| t.requisite.into_iter().map(|s| s.segments).collect())
            .unwrap_or_default();
        let create = CreateRequest {
            name: req.name,
            capacity,
            capabilities,
            params,
            requisite,
            source: None,
        };
        let controller = &self.driver.controller;
        let record = match source {
            None => controller.create(create).await?,
            Some(RequestedSource::Here(source)) => {
                controller
                    .create(CreateRequest {
                        source: Some(source),
                        ..create
                    })
                    .await?
            }
            Some(RequestedSource::Peer { snapshot, node }) => match self.driver.peer.get() {
                Some(peer) => peer.restore(controller, create, &snapshot, &node).await?,
                // RESOURCE_EXHAUSTED: a provisioner lets the scheduler pick another node.
                None => {
                    return Err(Error::Exhausted(format!(
                        "snapshot {snapshot} is held by node {node}, and this driver does not \
                         restore other nodes' snapshots (no --peer-listen)"
                    ))
                    .into())
                }
            },
        };
        tracing::Span::current().record("volume_id", tracing::field::display(&record.id));
        change
            .volume(&record.id)
            .bytes(record.capacity_bytes)
            .done();
        let mut volume = self.volume(&record);
        // A volume pulled from a peer records no local source; it answers with the one asked.
        if volume.content_source.is_none() {
            volume.content_source = asked_source;
        }
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    #[instrument(skip_all, fields(rpc = "DeleteVolume", volume_id = %request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Error::invalid("volume_id is required").into());
        }
        let change = Change::begin("volume deleted")
            .volume(&req.volume_id)
            .claim(self.driver.telemetry.claim(&req.volume_id));
        self.driver.controller.delete(&req.volume_id).await?;
        change.done();
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        Err(unimplemented("ControllerPublishVolume"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        Err(unimplemented("ControllerUnpublishVolume"))
    }

    #[instrument(skip_all, fields(rpc = "ValidateVolumeCapabilities", volume_id = %request.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Error::invalid("volume_id is required").into());
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::invalid("volume_capabilities are required").into());
        }
        let mut capabilities = Vec::new();
        let mut refusal = None;
        for cap in &req.volume_capabilities {
            match convert::capability(cap) {
                Ok(c) => capabilities.push(c),
                Err(CapabilityError::Malformed(e)) => return Err(e.into()),
                Err(CapabilityError::Unsupported(e)) => refusal = Some(e.to_string()),
            }
        }
        let params = match VolumeParams::parse(&req.parameters) {
            Ok(p) => Some(p),
            Err(e) => {
                refusal.get_or_insert(e.to_string());
                None
            }
        };
        if let Err(e) = IoLimits::default().apply(&req.mutable_parameters) {
            refusal.get_or_insert(e.to_string());
        }
        // Existence first: an unknown volume is NOT_FOUND whatever else is wrong.
        let verdict = self
            .driver
            .controller
            .validate(
                &req.volume_id,
                &capabilities,
                params.as_ref().filter(|_| !req.parameters.is_empty()),
            )
            .await?;
        let refusal = refusal.or(verdict.err());
        let response = match refusal {
            Some(message) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(response))
    }

    #[instrument(skip_all, fields(rpc = "ListVolumes"))]
    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let (page, next_token) = self
            .driver
            .controller
            .list(&req.starting_token, req.max_entries)
            .await?;
        let entries = page
            .into_iter()
            .map(|(record, abnormal)| pb::list_volumes_response::Entry {
                volume: Some(self.volume(&record)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(condition(abnormal)),
                }),
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "GetCapacity"))]
    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let params = VolumeParams::parse(&req.parameters)?;
        // A capability Kennel cannot serve has no room at all.
        let unsupported = req
            .volume_capabilities
            .iter()
            .any(|c| convert::capability(c).is_err());
        let segment = req.accessible_topology.map(|t| t.segments);
        let cap = self
            .driver
            .controller
            .capacity(params.backend, segment.as_ref())
            .await?;
        let available = if unsupported { 0 } else { cap.available_bytes };
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: convert::bytes(available),
            maximum_volume_size: Some(convert::bytes(available)),
            minimum_volume_size: Some(convert::bytes(self.driver.granularity)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::ExpandVolume,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
            Type::GetVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::ModifyVolume,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    #[instrument(skip_all, fields(rpc = "CreateSnapshot", snapshot_name = %request.get_ref().name, volume_id = %request.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let change = Change::begin("snapshot created")
            .volume(&req.source_volume_id)
            .claim(self.driver.telemetry.claim(&req.source_volume_id));
        convert::snapshot_params(&req.parameters)?;
        let snapshot = self
            .driver
            .controller
            .create_snapshot(req.name, &req.source_volume_id)
            .await?;
        change
            .snapshot(snapshot_handle::handle(&snapshot.id, self.node()))
            .bytes(snapshot.size_bytes)
            .done();
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(convert::snapshot(&snapshot, self.node())),
        }))
    }

    #[instrument(skip_all, fields(rpc = "DeleteSnapshot", snapshot_id = %request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let change = Change::begin("snapshot deleted").snapshot(&req.snapshot_id);
        if req.snapshot_id.is_empty() {
            return Err(Error::invalid("snapshot_id is required").into());
        }
        // Another node's snapshot is refused, never "deleted" here: its data would outlive
        // the VolumeSnapshotContent that holds it.
        if let Some(id) = snapshot_handle::local(&req.snapshot_id, self.node())? {
            self.driver.controller.delete_snapshot(id.as_str()).await?;
        }
        change.done();
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "ListSnapshots"))]
    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        // A snapshot ID of another node (or of none) lists nothing here.
        let snapshot_id = match snapshot_handle::locate(&req.snapshot_id, self.node()) {
            _ if req.snapshot_id.is_empty() => String::new(),
            Some(Located::Here(id)) => id.to_string(),
            Some(Located::Elsewhere { .. }) | None => {
                return Ok(Response::new(pb::ListSnapshotsResponse::default()));
            }
        };
        let (page, next_token) = self
            .driver
            .controller
            .list_snapshots(
                &snapshot_id,
                &req.source_volume_id,
                &req.starting_token,
                req.max_entries,
            )
            .await?;
        let entries = page
            .iter()
            .map(|s| pb::list_snapshots_response::Entry {
                snapshot: Some(convert::snapshot(s, self.node())),
            })
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        _: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Err(unimplemented("GetSnapshot"))
    }

    #[instrument(skip_all, fields(rpc = "ControllerExpandVolume", volume_id = %request.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let deadline = convert::call_deadline(request.metadata());
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Error::invalid("volume_id is required").into());
        }
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Error::invalid("capacity_range is required"))?;
        let range = convert::capacity_range(Some(range))?;
        if let Some(cap) = req.volume_capability.as_ref() {
            convert::capability(cap).map_err(Error::from)?;
        }
        let change = Change::begin("volume expanded")
            .volume(&req.volume_id)
            .claim(self.driver.telemetry.claim(&req.volume_id));
        let size = match self.driver.controller.expand(&req.volume_id, range).await {
            // Another node's volume, asked of this node's resizer (the elected one).
            Err(Error::VolumeNotFound(id)) => match &self.driver.cluster {
                Some(cluster) => {
                    let node = &self.driver.controller.identity().node_id;
                    expansion::expand_elsewhere(cluster, node, &id, range.required, deadline)
                        .await?
                }
                None => return Err(Error::VolumeNotFound(id).into()),
            },
            other => other?,
        };
        change.bytes(size).done();
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: convert::bytes(size),
            // The loop device and the filesystem grow on the node.
            node_expansion_required: true,
        }))
    }

    #[instrument(skip_all, fields(rpc = "ControllerGetVolume", volume_id = %request.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let (record, abnormal) = self.driver.controller.get(&req.volume_id).await?;
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(self.volume(&record)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
                volume_condition: Some(condition(abnormal)),
            }),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ControllerModifyVolume", volume_id = %request.get_ref().volume_id))]
    async fn controller_modify_volume(
        &self,
        request: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Error::invalid("volume_id is required").into());
        }
        let change = Change::begin("volume modified")
            .volume(&req.volume_id)
            .claim(self.driver.telemetry.claim(&req.volume_id));
        // The controller runs on the volume's node: its pods get the new limits now.
        self.driver
            .controller
            .modify(
                &req.volume_id,
                req.mutable_parameters,
                self.driver.node.io_limits_applier(),
            )
            .await?;
        change.done();
        Ok(Response::new(pb::ControllerModifyVolumeResponse {}))
    }
}
