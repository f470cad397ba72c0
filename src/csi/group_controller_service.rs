//! GroupController service glue: volume group snapshots (see
//! `volume::controller_ops::group_snapshots` for what they guarantee).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::csi::change_log::Change;
use crate::csi::convert;
use crate::csi::pb::{
    self, group_controller_server::GroupController as GroupControllerRpc,
    group_controller_service_capability,
};
use crate::csi::server::Driver;
use crate::csi::snapshot_handle;

pub struct GroupControllerService {
    driver: Arc<Driver>,
}

impl GroupControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        GroupControllerService { driver }
    }

    /// This node's name, which snapshot IDs carry.
    fn node(&self) -> &str {
        &self.driver.controller.identity().node_id
    }

    /// A group's member IDs as the backend knows them. A group is cut on one node, so a
    /// member of another node's is refused; IDs no snapshot can have are left for the
    /// group's own check to reject.
    fn members(&self, raw: &[String]) -> Result<Vec<String>, Status> {
        raw.iter()
            .map(|r| {
                Ok(snapshot_handle::local(r, self.node())?
                    .map_or_else(|| r.clone(), |id| id.to_string()))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl GroupControllerRpc for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        use group_controller_service_capability::{rpc::Type, Rpc};
        Ok(Response::new(pb::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![pb::GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(Rpc {
                    r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    #[instrument(skip_all, fields(rpc = "CreateVolumeGroupSnapshot", group_snapshot_name = %request.get_ref().name))]
    async fn create_volume_group_snapshot(
        &self,
        request: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let change = Change::begin("group snapshot created");
        // VolumeGroupSnapshotClass parameters: the same rule as a VolumeSnapshotClass's.
        convert::group_snapshot_params(&req.parameters)?;
        let group = self
            .driver
            .controller
            .create_group_snapshot(req.name, &req.source_volume_ids)
            .await?;
        change
            .snapshot(&group.id)
            .bytes(group.members.iter().map(|m| m.size_bytes).sum())
            .done();
        Ok(Response::new(pb::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(convert::group_snapshot(&group, self.node())),
        }))
    }

    #[instrument(skip_all, fields(rpc = "DeleteVolumeGroupSnapshot", group_snapshot_id = %request.get_ref().group_snapshot_id))]
    async fn delete_volume_group_snapshot(
        &self,
        request: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let change = Change::begin("group snapshot deleted").snapshot(&req.group_snapshot_id);
        self.driver
            .controller
            .delete_group_snapshot(&req.group_snapshot_id, &self.members(&req.snapshot_ids)?)
            .await?;
        change.done();
        Ok(Response::new(pb::DeleteVolumeGroupSnapshotResponse {}))
    }

    #[instrument(skip_all, fields(rpc = "GetVolumeGroupSnapshot", group_snapshot_id = %request.get_ref().group_snapshot_id))]
    async fn get_volume_group_snapshot(
        &self,
        request: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let group = self
            .driver
            .controller
            .get_group_snapshot(&req.group_snapshot_id, &self.members(&req.snapshot_ids)?)
            .await?;
        Ok(Response::new(pb::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(convert::group_snapshot(&group, self.node())),
        }))
    }
}
