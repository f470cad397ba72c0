//! StatefulSet PVC retention controller (`kennel retention`).
//!
//! `policy` decides (pure), `controller` talks to the API server, `leader` keeps a single writer.
//! The README section "Retention controller" describes the behaviour for users.

pub mod builtin;
pub mod controller;
pub mod leader;
pub mod migration_record;
pub mod names;
pub mod node_fit;
pub mod nodeloss;
pub mod orphan_sweeper;
pub mod orphans;
pub mod owners;
pub mod policy;
pub mod rbac;
pub mod retention_metrics;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
pub(crate) mod mock_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use tracing::{info, warn};

use crate::shutdown::shutdown_signal;
pub use builtin::BuiltinMode;

/// Flags of `kennel retention`.
#[derive(clap::Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Whether Kubernetes' own StatefulSet controller enforces
    /// spec.persistentVolumeClaimRetentionPolicy (auto: always from server version 1.32; on
    /// 1.23-1.31 for exactly the sets whose spec the API server kept the field in). Where it
    /// does, Kennel writes no owner references and only adds its guards.
    #[arg(long, value_enum, default_value = "auto")]
    pub builtin_retention: BuiltinMode,

    /// Accept --builtin-retention=off on a server where the built-in retention is GA (1.32+),
    /// where it is refused otherwise: only for clusters that run without Kubernetes'
    /// StatefulSet controller, or two controllers write the same claims' owner references.
    #[arg(long)]
    pub force_builtin_retention_off: bool,

    /// How long after a node's loss is first seen (Node deleted or tainted
    /// node.kubernetes.io/out-of-service) its pods' claims are recreated
    /// (only for sets annotated kennel.csi.dev/on-node-loss=recreate).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub node_loss_grace: Duration,

    /// VolumeSnapshotClass of the snapshots that move a drained node's claims (sets annotated
    /// kennel.csi.dev/on-drain=migrate).
    #[arg(long, default_value = "kennel")]
    pub migration_snapshot_class: String,

    /// Every StatefulSet is planned again at least this often.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// Delete out-of-range claims whose condemned pod vanished before the pod reference was
    /// written (whenScaled=Delete only). Kubernetes keeps such claims forever.
    #[arg(long)]
    pub sweep_orphaned_claims: bool,

    /// CSI driver name of Kennel volumes.
    #[arg(long, default_value = "kennel.csi.dev")]
    pub driver_name: String,

    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9102).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,

    /// Run only while holding a coordination.k8s.io Lease (for more than one replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader election Lease.
    #[arg(long, default_value = "kennel-retention")]
    pub lease_name: String,

    /// Namespace of the leader election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kennel-system")]
    pub lease_namespace: String,

    /// How long a leader's Lease is valid without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
}

/// This replica's name in events and in the Lease.
fn identity() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("kennel-retention-{}", std::process::id()))
}

/// Builds a client from the environment (in-cluster or kubeconfig) and runs the controller until
/// SIGTERM/SIGINT, or until leadership is lost (an error, so the pod restarts and rejoins).
pub async fn run(args: RetentionArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("building a Kubernetes client from the environment")?;
    let version = client
        .apiserver_version()
        .await
        .context("reading the API server version")?;
    builtin::check_off_allowed(
        args.builtin_retention,
        args.force_builtin_retention_off,
        &version.major,
        &version.minor,
    )
    .map_err(anyhow::Error::msg)?;
    let builtin = args
        .builtin_retention
        .resolve(&version.major, &version.minor);
    info!(
        server = %version.git_version,
        mode = ?args.builtin_retention,
        rule = ?builtin,
        "built-in StatefulSet retention: {}",
        builtin.describe()
    );
    let metrics = Arc::new(retention_metrics::Metrics::default());
    if let Some(addr) = args.metrics_addr {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics_endpoint::serve(addr, m).await {
                warn!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }
    let settings = controller::Settings {
        builtin,
        sweep_orphaned_claims: args.sweep_orphaned_claims,
        node_loss_grace: args.node_loss_grace,
        snapshot_class: args.migration_snapshot_class.clone(),
        driver_name: args.driver_name.clone(),
        resync_interval: args.resync_interval,
    };
    let me = identity();

    if !args.leader_election {
        controller::run(client, settings, metrics, Some(me), shutdown_signal()).await;
        return Ok(());
    }
    let lock = leader::LeaseLock::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &me,
        args.lease_duration,
    );
    tokio::select! {
        _ = lock.acquire() => {}
        _ = shutdown_signal() => return Ok(()),
    }
    info!(identity = %me, lease = %args.lease_name, "leading");
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = lost_rx => {}
        }
    };
    let running = controller::run(client, settings, metrics, Some(me), stop);
    tokio::pin!(running);
    tokio::select! {
        _ = &mut running => Ok(()),
        _ = lock.keep() => {
            let _ = lost_tx.send(());
            running.await;
            anyhow::bail!("lost the leader Lease {}/{}", args.lease_namespace, args.lease_name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RetentionArgs,
    }

    #[test]
    fn flags_have_safe_defaults() {
        let a = Cli::try_parse_from(["kennel"])
            .expect("defaults parse")
            .args;
        assert_eq!(a.builtin_retention, BuiltinMode::Auto);
        assert_eq!(a.node_loss_grace, Duration::from_secs(300));
        assert!(!a.sweep_orphaned_claims);
        assert_eq!(a.driver_name, "kennel.csi.dev");
        assert!(a.leader_election);
        assert!(!a.force_builtin_retention_off);
    }

    #[test]
    fn flags_parse_durations_and_modes() {
        let a = Cli::try_parse_from([
            "kennel",
            "--builtin-retention",
            "off",
            "--node-loss-grace",
            "90s",
            "--resync-interval",
            "1h",
            "--sweep-orphaned-claims",
            "--leader-election",
            "false",
        ])
        .expect("parse")
        .args;
        assert_eq!(a.builtin_retention, BuiltinMode::Off);
        assert_eq!(a.node_loss_grace, Duration::from_secs(90));
        assert_eq!(a.resync_interval, Duration::from_secs(3600));
        assert!(a.sweep_orphaned_claims);
        assert!(!a.leader_election);
        assert!(Cli::try_parse_from(["kennel", "--node-loss-grace", "5"]).is_err());
        assert!(Cli::try_parse_from(["kennel", "--builtin-retention", "maybe"]).is_err());
    }
}
