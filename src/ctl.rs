//! `kennel ctl`: a CSI client for people, against any CSI socket. Tables and readable fields by
//! default, `--json` (stable field names, bytes as numbers) for scripts.

mod local_state;
mod render;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::csi::client::CsiClient;
use crate::csi::pb::{self, volume_capability as vc};
use crate::csi::server::CONTEXT_NODE;
use crate::model::capacity::parse_size;
use crate::model::spec::{PARAM_PVC_NAME, PARAM_PVC_NAMESPACE, PARAM_PV_NAME};

pub use local_state::NodeState;
pub use render::size as human_size;

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// CSI endpoint to talk to.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/kennel/csi.sock"
    )]
    pub endpoint: String,
    /// Print JSON instead of text (same as `-o json`).
    #[arg(long, global = true)]
    pub json: bool,
    /// Output format: a table (default), a wider table, or JSON.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
}

/// How the volume is used: a filesystem (default) or a raw block device.
#[derive(Debug, Clone, clap::Args)]
pub struct UsageArgs {
    /// Raw block volume instead of a filesystem.
    #[arg(long)]
    pub block: bool,
    /// Filesystem type (ext4, xfs); empty for the driver's default.
    #[arg(long, default_value = "")]
    pub fs_type: String,
    /// Mount flags, e.g. --mount-flag noatime.
    #[arg(long = "mount-flag")]
    pub mount_flags: Vec<String>,
    /// Single-node read-only access.
    #[arg(long)]
    pub read_only_mode: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Plugin identity, capabilities and node info.
    Info,
    /// Create (or find, by name) a volume.
    Create {
        name: String,
        /// Size, e.g. 64Mi or 10GiB.
        #[arg(long, value_parser = parse_size, default_value = "1Gi")]
        size: u64,
        /// StorageClass parameter key=value (repeatable).
        #[arg(long = "param", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// Start from this snapshot's data.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Start as a copy of this volume.
        #[arg(long)]
        from_volume: Option<String>,
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// Snapshot a volume (idempotent by name).
    Snapshot { name: String, volume_id: String },
    /// List snapshots, optionally of one volume.
    Snapshots {
        #[arg(long, default_value = "")]
        volume_id: String,
    },
    /// Delete a snapshot (OK if it is already gone).
    DeleteSnapshot { snapshot_id: String },
    /// List volumes: size, access type, claim, state on this node, condition.
    List {
        #[arg(long, default_value_t = 0)]
        max_entries: i32,
        #[arg(long, default_value = "")]
        starting_token: String,
    },
    /// Capacity available for new volumes.
    Capacity,
    /// Stage a volume at a staging directory (format if blank, mount).
    Stage {
        volume_id: String,
        #[arg(long)]
        staging: String,
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// Publish a staged volume at a target path.
    Publish {
        volume_id: String,
        #[arg(long)]
        staging: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// Usage and condition of a published or staged volume.
    Stats {
        volume_id: String,
        #[arg(long)]
        path: String,
    },
    /// Grow a volume (controller), and its filesystem when --path is given (node).
    Expand {
        volume_id: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        path: Option<String>,
    },
    /// Unmount a volume from a target path (OK if it is not mounted there).
    Unpublish {
        volume_id: String,
        #[arg(long)]
        target: String,
    },
    /// Unmount a volume from its staging directory and detach it (OK if it is not staged).
    Unstage {
        volume_id: String,
        #[arg(long)]
        staging: String,
    },
    /// Delete a volume and its data (OK if it is already gone).
    Delete { volume_id: String },
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {raw:?}"))
}

pub fn capability(usage: &UsageArgs) -> pb::VolumeCapability {
    let access_type = if usage.block {
        vc::AccessType::Block(vc::BlockVolume {})
    } else {
        vc::AccessType::Mount(vc::MountVolume {
            fs_type: usage.fs_type.clone(),
            mount_flags: usage.mount_flags.clone(),
            volume_mount_group: String::new(),
        })
    };
    let mode = if usage.read_only_mode {
        vc::access_mode::Mode::SingleNodeReaderOnly
    } else {
        vc::access_mode::Mode::SingleNodeWriter
    };
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(vc::AccessMode { mode: mode as i32 }),
    }
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "created_unix": s.creation_time.as_ref().map(|t| t.seconds),
    })
}

fn volume_json(v: &pb::Volume) -> Value {
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
fn plugin_capability_name(c: &pb::PluginCapability) -> String {
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
async fn with_progress<T>(label: &str, call: impl Future<Output = T>) -> T {
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

/// Which shape of text a command's answer is printed in.
#[derive(Clone, Copy)]
enum View {
    Info,
    Volumes,
    Snapshots,
    Capacity,
    Fields,
}

impl View {
    fn of(command: &CtlCommand) -> View {
        match command {
            CtlCommand::Info => View::Info,
            CtlCommand::List { .. } => View::Volumes,
            CtlCommand::Snapshots { .. } => View::Snapshots,
            CtlCommand::Capacity => View::Capacity,
            _ => View::Fields,
        }
    }
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let mut client = CsiClient::connect(&args.endpoint).await?;
    let view = View::of(&args.command);
    let output = execute(&mut client, args.command).await.map_err(|e| {
        match e.downcast::<tonic::Status>() {
            // The gRPC code is what a person (or script) needs first.
            Ok(status) => anyhow::anyhow!("{:?}: {}", status.code(), status.message()),
            Err(other) => other,
        }
    })?;
    let mode = if args.json { Output::Json } else { args.output };
    if mode == Output::Json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", text(view, &output, mode == Output::Wide));
    }
    Ok(())
}

async fn execute(c: &mut CsiClient, command: CtlCommand) -> anyhow::Result<Value> {
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
    })
}

/// The text a person reads for a command's answer.
fn text(view: View, value: &Value, wide: bool) -> String {
    match view {
        View::Volumes => volumes_table(value, wide),
        View::Snapshots => snapshots_table(value),
        View::Info | View::Capacity | View::Fields => fields_text(value),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(scalar).collect();
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(", ")
            }
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}={}", scalar(v)))
                .collect();
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(", ")
            }
        }
        other => other.to_string(),
    }
}

fn bytes(v: &Value) -> String {
    v.as_u64().map_or_else(|| scalar(v), render::size)
}

/// `key: value` lines; sizes in binary units, keys without their `_bytes` suffix.
fn fields_text(value: &Value) -> String {
    let Value::Object(map) = value else {
        return format!("{}\n", scalar(value));
    };
    let pairs: Vec<(&str, String)> = map
        .iter()
        .map(|(k, v)| match k.strip_suffix("_bytes") {
            Some(short) => (short, bytes(v)),
            None if k.ends_with("_size") => (k.as_str(), bytes(v)),
            None => (k.as_str(), scalar(v)),
        })
        .collect();
    render::fields(&pairs)
}

/// `ext4` / `xfs` / `block` when mounted here.
fn access_type(state: &Value) -> String {
    scalar(&state["fs_type"])
}

fn volumes_table(value: &Value, wide: bool) -> String {
    let empty = Vec::new();
    let volumes = value["volumes"].as_array().unwrap_or(&empty);
    if volumes.is_empty() {
        return "No volumes.\n".to_owned();
    }
    let mut header = vec!["ID", "SIZE", "TYPE", "CLAIM", "STATE", "CONDITION"];
    if wide {
        header.extend(["PV", "NODE", "PARAMETERS"]);
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let state = &v["node_state"];
            let summary = serde_json::from_value::<NodeState>(state.clone())
                .map_or_else(|_| "-".to_owned(), |s| s.summary());
            let condition = if v["abnormal"] == true {
                scalar(&v["condition"])
            } else {
                "healthy".to_owned()
            };
            let mut row = vec![
                scalar(&v["volume_id"]),
                bytes(&v["capacity_bytes"]),
                access_type(state),
                scalar(&v["claim"]),
                summary,
                condition,
            ];
            if wide {
                let params: BTreeMap<&str, &Value> = v["volume_context"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| !k.contains('/'))
                    .map(|(k, v)| (k.as_str(), v))
                    .collect();
                row.extend([scalar(&v["pv"]), scalar(&v["node"]), scalar(&json!(params))]);
            }
            row
        })
        .collect();
    let mut out = render::table(&header, &rows);
    if let Some(token) = value["next_token"].as_str().filter(|t| !t.is_empty()) {
        out.push_str(&format!("(more: --starting-token {token})\n"));
    }
    out
}

fn snapshots_table(value: &Value) -> String {
    let empty = Vec::new();
    let snapshots = value["snapshots"].as_array().unwrap_or(&empty);
    if snapshots.is_empty() {
        return "No snapshots.\n".to_owned();
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let created = s["created_unix"]
                .as_i64()
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                .map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                );
            vec![
                scalar(&s["snapshot_id"]),
                scalar(&s["source_volume_id"]),
                bytes(&s["size_bytes"]),
                scalar(&s["ready_to_use"]),
                created,
            ]
        })
        .collect();
    render::table(&["ID", "SOURCE", "SIZE", "READY", "CREATED"], &rows)
}

#[cfg(test)]
mod tests;
