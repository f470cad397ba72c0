//! Node service glue.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::csi::change_log::{claim_in, Change};
use crate::csi::convert;
use crate::csi::pb::{self, node_server::Node, node_service_capability};
use crate::csi::server::Driver;
use crate::error::Error;
use crate::model::spec::host_path;
use crate::volume::node_ops::{PublishRequest, StageRequest, VolumeStats};

pub struct NodeService {
    driver: Arc<Driver>,
}

impl NodeService {
    pub fn new(driver: Arc<Driver>) -> Self {
        NodeService { driver }
    }
}

fn require_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid("volume_id is required"));
    }
    Ok(())
}

/// A volume path to inspect: required, but a path that cannot be a mount of
/// ours (relative, with `..`) simply does not hold the volume: NOT_FOUND.
fn existing_volume_path(raw: &str) -> Result<std::path::PathBuf, Error> {
    if raw.is_empty() {
        return Err(Error::invalid("volume_path is required"));
    }
    host_path(raw, "volume_path")
        .map_err(|_| Error::NotFound(format!("volume path {raw:?} does not exist")))
}

fn usage(unit: pb::volume_usage::Unit, total: u64, available: u64, used: u64) -> pb::VolumeUsage {
    pb::VolumeUsage {
        available: convert::bytes(available),
        total: convert::bytes(total),
        used: convert::bytes(used),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    #[instrument(skip_all, fields(rpc = "NodeStageVolume", volume_id = %request.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.volume_id)?;
        let staging_path = host_path(&req.staging_target_path, "staging_target_path")?;
        let capability = convert::required_capability(req.volume_capability.as_ref())?;
        // Checked here, applied on publish (where the kubelet expects the files' group).
        convert::mount_group(req.volume_capability.as_ref())?;
        let change = Change::begin("volume staged")
            .volume(&req.volume_id)
            .claim(claim_in(&req.volume_context))
            .claim(self.driver.telemetry.claim(&req.volume_id))
            .staging(&staging_path);
        self.driver
            .node
            .stage(StageRequest {
                volume_id: req.volume_id,
                staging_path,
                capability,
            })
            .await?;
        change.done();
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "NodeUnstageVolume", volume_id = %request.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.volume_id)?;
        let staging_path = host_path(&req.staging_target_path, "staging_target_path")?;
        let change = Change::begin("volume unstaged")
            .volume(&req.volume_id)
            .claim(self.driver.telemetry.claim(&req.volume_id))
            .staging(&staging_path);
        self.driver
            .node
            .unstage(&req.volume_id, staging_path)
            .await?;
        change.done();
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "NodePublishVolume", volume_id = %request.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.volume_id)?;
        let staging_path = host_path(&req.staging_target_path, "staging_target_path")?;
        let target_path = host_path(&req.target_path, "target_path")?;
        let capability = convert::required_capability(req.volume_capability.as_ref())?;
        let mount_group = convert::mount_group(req.volume_capability.as_ref())?;
        let change = Change::begin("volume published")
            .volume(&req.volume_id)
            .claim(claim_in(&req.volume_context))
            .claim(self.driver.telemetry.claim(&req.volume_id))
            .staging(&staging_path)
            .target(&target_path);
        self.driver
            .node
            .publish(PublishRequest {
                volume_id: req.volume_id,
                staging_path,
                target_path,
                capability,
                read_only: req.readonly,
                mount_group,
            })
            .await?;
        change.done();
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "NodeUnpublishVolume", volume_id = %request.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.volume_id)?;
        let target_path = host_path(&req.target_path, "target_path")?;
        let change = Change::begin("volume unpublished")
            .volume(&req.volume_id)
            .claim(self.driver.telemetry.claim(&req.volume_id))
            .target(&target_path);
        self.driver
            .node
            .unpublish(&req.volume_id, target_path)
            .await?;
        change.done();
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "NodeGetVolumeStats", volume_id = %request.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.volume_id)?;
        let volume_path = existing_volume_path(&req.volume_path)?;
        let report = self.driver.node.stats(&req.volume_id, volume_path).await?;
        use pb::volume_usage::Unit;
        let usage = match report.stats {
            VolumeStats::Filesystem(u) => vec![
                usage(Unit::Bytes, u.total_bytes, u.available_bytes, u.used_bytes),
                usage(Unit::Inodes, u.total_inodes, u.free_inodes, u.used_inodes),
            ],
            VolumeStats::Block { total_bytes } => vec![pb::VolumeUsage {
                total: convert::bytes(total_bytes),
                unit: Unit::Bytes as i32,
                ..Default::default()
            }],
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(pb::VolumeCondition {
                abnormal: report.abnormal.is_some(),
                message: report
                    .abnormal
                    .unwrap_or_else(|| crate::csi::driver_metrics::HEALTHY.to_owned()),
            }),
        }))
    }

    #[instrument(skip_all, fields(rpc = "NodeExpandVolume", volume_id = %request.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.volume_id)?;
        let volume_path = existing_volume_path(&req.volume_path)?;
        let range = convert::capacity_range(req.capacity_range.as_ref())?;
        if let Some(cap) = req.volume_capability.as_ref() {
            convert::capability(cap).map_err(Error::from)?;
        }
        let change = Change::begin("volume filesystem expanded")
            .volume(&req.volume_id)
            .claim(self.driver.telemetry.claim(&req.volume_id))
            .target(&volume_path);
        let size = self
            .driver
            .node
            .expand(&req.volume_id, volume_path, range)
            .await?;
        change.bytes(size).done();
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: convert::bytes(size),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::VolumeMountGroup,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let identity = self.driver.controller.identity();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: identity.node_id.clone(),
            max_volumes_per_node: self.driver.max_volumes_per_node,
            accessible_topology: Some(convert::topology(&identity.topology)),
        }))
    }
}
