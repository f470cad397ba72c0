//! What each `kennel ctl` command asks the CSI socket, and the JSON it answers with (the
//! `--json` output; the text views render the same value).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{capability, local_state, CtlCommand};
use crate::csi::client::CsiClient;
use crate::csi::pb;
use crate::csi::server::CONTEXT_NODE;
use crate::model::spec::{PARAM_PVC_NAME, PARAM_PVC_NAMESPACE, PARAM_PV_NAME};

pub(super) fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "created_unix": s.creation_time.as_ref().map(|t| t.seconds),
    })
}

pub(super) fn volume_json(v: &pb::Volume) -> Value {
    let ctx = &v.volume_context;
    let claim = match (ctx.get(PARAM_PVC_NAMESPACE), ctx.get(PARAM_PVC_NAME)) {
        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
        _ => None,
    };
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "claim": claim,
        "pv": ctx.get(PARAM_PV_NAME),
        "node": ctx.get(CONTEXT_NODE),
        "volume_context": v.volume_context,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
    })
}

/// The stable name of a plugin capability (`CONTROLLER_SERVICE`, `VOLUME_EXPANSION_ONLINE`).
pub(super) fn plugin_capability_name(c: &pb::PluginCapability) -> String {
    use pb::plugin_capability::{service, volume_expansion, Type};
    match &c.r#type {
        Some(Type::Service(s)) => service::Type::try_from(s.r#type)
            .map_or("UNKNOWN", |t| t.as_str_name())
            .to_owned(),
        Some(Type::VolumeExpansion(e)) => format!(
            "VOLUME_EXPANSION_{}",
            volume_expansion::Type::try_from(e.r#type).map_or("UNKNOWN", |t| t.as_str_name())
        ),
        None => "UNKNOWN".to_owned(),
    }
}

/// While `call` runs, a person at a terminal sees it is still going (long copies take minutes).
pub(super) async fn with_progress<T>(label: &str, call: impl Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return call.await;
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(call);
    loop {
        tokio::select! {
            result = &mut call => {
                eprint!("\r\x1b[2K");
                return result;
            }
            _ = tick.tick() => {
                eprint!("\r{label}... {}s", started.elapsed().as_secs());
            }
        }
    }
}

pub(super) async fn execute(c: &mut CsiClient, command: CtlCommand) -> anyhow::Result<Value> {
    Ok(match command {
        CtlCommand::Info => {
            let info = c
                .identity
                .get_plugin_info(pb::GetPluginInfoRequest {})
                .await?
                .into_inner();
            let caps = c
                .identity
                .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
                .await?
                .into_inner();
            let probe = c.identity.probe(pb::ProbeRequest {}).await?.into_inner();
            let node = c
                .node
                .node_get_info(pb::NodeGetInfoRequest {})
                .await?
                .into_inner();
            json!({
                "name": info.name,
                "vendor_version": info.vendor_version,
                "manifest": info.manifest,
                "ready": probe.ready.unwrap_or(true),
                "plugin_capabilities": caps.capabilities.iter().map(plugin_capability_name).collect::<Vec<_>>(),
                "node_id": node.node_id,
                "max_volumes_per_node": node.max_volumes_per_node,
                "topology": node.accessible_topology.map(|t| t.segments).unwrap_or_default(),
            })
        }
        CtlCommand::Create {
            name,
            size,
            params,
            from_snapshot,
            from_volume,
            usage,
        } => {
            use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
                (None, None) => None,
            };
            let label = match &source {
                Some(Type::Snapshot(s)) => format!("copying snapshot {}", s.snapshot_id),
                Some(Type::Volume(v)) => format!("copying volume {}", v.volume_id),
                None => "creating".to_owned(),
            };
            let mut controller = c.controller.clone();
            let volume = with_progress(
                &label,
                controller.create_volume(pb::CreateVolumeRequest {
                    name,
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: size as i64,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![capability(&usage)],
                    parameters: params.into_iter().collect::<BTreeMap<_, _>>(),
                    volume_content_source: source
                        .map(|t| pb::VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                }),
            )
            .await?
            .into_inner()
            .volume
            .unwrap_or_default();
            volume_json(&volume)
        }
        CtlCommand::Snapshot { name, volume_id } => {
            let label = format!("snapshotting {volume_id}");
            let mut controller = c.controller.clone();
            let snapshot = with_progress(
                &label,
                controller.create_snapshot(pb::CreateSnapshotRequest {
                    name,
                    source_volume_id: volume_id,
                    ..Default::default()
                }),
            )
            .await?
            .into_inner()
            .snapshot
            .unwrap_or_default();
            snapshot_json(&snapshot)
        }
        CtlCommand::Snapshots { volume_id } => {
            let mut snapshots = Vec::new();
            let mut token = String::new();
            loop {
                let page = c
                    .controller
                    .list_snapshots(pb::ListSnapshotsRequest {
                        source_volume_id: volume_id.clone(),
                        starting_token: token,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                snapshots.extend(
                    page.entries
                        .iter()
                        .filter_map(|e| e.snapshot.as_ref())
                        .map(snapshot_json),
                );
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            json!({ "snapshots": snapshots })
        }
        CtlCommand::DeleteSnapshot { snapshot_id } => {
            c.controller
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.clone(),
                    ..Default::default()
                })
                .await?;
            json!({ "deleted_snapshot": snapshot_id })
        }
        CtlCommand::List {
            max_entries,
            starting_token,
        } => {
            let list = c
                .controller
                .list_volumes(pb::ListVolumesRequest {
                    max_entries,
                    starting_token,
                })
                .await?
                .into_inner();
            let ids: Vec<&str> = list
                .entries
                .iter()
                .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.as_str()))
                .collect();
            let here = local_state::read(&ids);
            let volumes: Vec<Value> = list
                .entries
                .iter()
                .map(|e| {
                    let mut v = volume_json(e.volume.as_ref().unwrap_or(&pb::Volume::default()));
                    let condition = e.status.as_ref().and_then(|s| s.volume_condition.as_ref());
                    v["abnormal"] = json!(condition.is_some_and(|c| c.abnormal));
                    v["condition"] = json!(condition.map(|c| c.message.as_str()));
                    let state = v["volume_id"].as_str().and_then(|id| here.get(id));
                    v["node_state"] = json!(state.cloned().unwrap_or_default());
                    v
                })
                .collect();
            json!({ "volumes": volumes, "next_token": list.next_token })
        }
        CtlCommand::Capacity => {
            let cap = c
                .controller
                .get_capacity(pb::GetCapacityRequest::default())
                .await?
                .into_inner();
            json!({
                "available_bytes": cap.available_capacity,
                "maximum_volume_size": cap.maximum_volume_size,
                "minimum_volume_size": cap.minimum_volume_size,
            })
        }
        CtlCommand::Stage {
            volume_id,
            staging,
            usage,
        } => {
            c.node
                .node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging.clone(),
                    volume_capability: Some(capability(&usage)),
                    ..Default::default()
                })
                .await?;
            json!({ "staged": volume_id, "staging_target_path": staging })
        }
        CtlCommand::Publish {
            volume_id,
            staging,
            target,
            readonly,
            usage,
        } => {
            c.node
                .node_publish_volume(pb::NodePublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging,
                    target_path: target.clone(),
                    volume_capability: Some(capability(&usage)),
                    readonly,
                    ..Default::default()
                })
                .await?;
            json!({ "published": volume_id, "target_path": target, "readonly": readonly })
        }
        CtlCommand::Stats { volume_id, path } => {
            let stats = c
                .node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path,
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            let usage: Vec<Value> = stats
                .usage
                .iter()
                .map(|u| {
                    json!({
                        "unit": pb::volume_usage::Unit::try_from(u.unit).map_or("UNKNOWN", |u| u.as_str_name()),
                        "total": u.total, "used": u.used, "available": u.available,
                    })
                })
                .collect();
            let condition = stats.volume_condition.unwrap_or_default();
            json!({ "usage": usage, "abnormal": condition.abnormal, "message": condition.message })
        }
        CtlCommand::Expand {
            volume_id,
            size,
            path,
        } => {
            let range = pb::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            };
            let grown = c
                .controller
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: volume_id.clone(),
                    capacity_range: Some(range),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut out = json!({ "volume_id": volume_id, "capacity_bytes": grown.capacity_bytes });
            if let Some(path) = path {
                let node = c
                    .node
                    .node_expand_volume(pb::NodeExpandVolumeRequest {
                        volume_id,
                        volume_path: path,
                        capacity_range: Some(range),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                out["node_capacity_bytes"] = json!(node.capacity_bytes);
            }
            out
        }
        CtlCommand::Unpublish { volume_id, target } => {
            c.node
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: target,
                })
                .await?;
            json!({ "unpublished": volume_id })
        }
        CtlCommand::Unstage { volume_id, staging } => {
            c.node
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging,
                })
                .await?;
            json!({ "unstaged": volume_id })
        }
        CtlCommand::Delete { volume_id } => {
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: volume_id.clone(),
                    secrets: Default::default(),
                })
                .await?;
            json!({ "deleted": volume_id })
        }
        CtlCommand::Where { .. } => anyhow::bail!("`where` reads the cluster, not a CSI endpoint"),
    })
}
