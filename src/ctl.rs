//! `kennel ctl`: a CSI client for people, against any CSI socket. Tables and readable fields by
//! default, `--json` (stable field names, bytes as numbers) for scripts.

mod execute;
mod local_state;
mod render;
mod whereabouts;

use crate::csi::client::CsiClient;
use crate::csi::pb::{self, volume_capability as vc};
use crate::model::volume_size::parse_size;

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
    /// Where each claim's data is, and any move or pull under way (from the Kubernetes API:
    /// a kubeconfig or the pod's account that can list PVs, claims and kennel-system's
    /// Leases; the CSI endpoint is not used).
    Where {
        /// Only this namespace's claims.
        #[arg(short, long)]
        namespace: Option<String>,
        /// CSI driver name of Kennel volumes.
        #[arg(long, default_value = "kennel.csi.dev")]
        driver_name: String,
    },
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

/// `kennel ctl where`: read the cluster, print the placements.
async fn run_where(
    namespace: Option<String>,
    driver_name: &str,
    mode: Output,
) -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    use kube::api::{Api, ListParams};

    let client = kube::Client::try_default().await?;
    let lp = ListParams::default();
    let volumes = Api::<PersistentVolume>::all(client.clone())
        .list(&lp)
        .await?;
    let claims = match &namespace {
        Some(ns) => Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
    .list(&lp)
    .await?;
    let leases = Api::<Lease>::namespaced(client, crate::peer::cluster::PEER_NAMESPACE)
        .list(&lp)
        .await?;
    let rows = whereabouts::placements(
        driver_name,
        namespace.as_deref(),
        &volumes.items,
        &claims.items,
        &leases.items,
    );
    if mode == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", whereabouts::render(&rows));
    }
    Ok(())
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let mode = if args.json { Output::Json } else { args.output };
    if let CtlCommand::Where {
        namespace,
        driver_name,
    } = args.command
    {
        return run_where(namespace, &driver_name, mode).await;
    }
    let mut client = CsiClient::connect(&args.endpoint).await?;
    let view = View::of(&args.command);
    let output = execute::execute(&mut client, args.command)
        .await
        .map_err(|e| {
            match e.downcast::<tonic::Status>() {
                // The gRPC code is what a person (or script) needs first.
                Ok(status) => anyhow::anyhow!("{:?}: {}", status.code(), status.message()),
                Err(other) => other,
            }
        })?;
    if mode == Output::Json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", render::text(view, &output, mode == Output::Wide));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
