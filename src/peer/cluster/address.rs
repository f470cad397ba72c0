//! Where each node's peer server listens: one Lease per node in the driver's namespace,
//! `kennel-peer-<node>`, held by the node and annotated with its `<ip>:<port>`.
//!
//! The address only says where to connect, never who answers: anyone able to write a Lease
//! could point it elsewhere, so the puller's TLS handshake checks that the peer's certificate
//! (issued by the cluster CA) names the node it meant to reach.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{bail, Context as _};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::Client;
use ring::digest::{digest, SHA256};

use super::{FIELD_MANAGER, PEER_NAMESPACE};
use crate::peer::digest::hex;
use crate::peer::name::NodeName;
use crate::peer::transfers::{TransferStatus, TRANSFERS_ANNOTATION};

/// The annotation of a node's Lease that holds its peer server's `<ip>:<port>`.
pub const PEER_ADDRESS_ANNOTATION: &str = "kennel.csi.dev/peer-address";
const LEASE_PREFIX: &str = "kennel-peer-";
/// Kubernetes object names are DNS subdomains: at most 253 characters.
const MAX_NAME: usize = 253;
/// Bytes of the node name's SHA-256 that tell apart long names sharing their first characters.
const HASH_BYTES: usize = 8;

/// The name of `node`'s Lease: `kennel-peer-<node>`, or, for a node name too long for that,
/// as much of it as fits, then `-` and a hash of the whole name. (A short node name chosen to
/// equal such a name would share the Lease; [`peer_address`] checks the holder and says so.)
pub fn lease_name(node: &NodeName) -> String {
    let full = format!("{LEASE_PREFIX}{node}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let suffix = hex(&digest(&SHA256, node.as_str().as_bytes()).as_ref()[..HASH_BYTES]);
    let room = MAX_NAME - LEASE_PREFIX.len() - 1 - suffix.len();
    // Node names are ASCII; a name must not end a label with '.' or '-' before the suffix.
    let head = node.as_str()[..room].trim_end_matches(['.', '-']);
    format!("{LEASE_PREFIX}{head}-{suffix}")
}

fn usable(address: SocketAddr) -> bool {
    !address.ip().is_unspecified() && address.port() != 0
}

/// Publish that `node`'s peer server listens at `address` (server-side apply: the Lease is
/// made or updated in one idempotent call, and only the fields set here are claimed).
pub async fn advertise(
    client: &Client,
    node: &NodeName,
    address: SocketAddr,
) -> anyhow::Result<()> {
    if !usable(address) {
        bail!("{address} is no address a peer can connect to");
    }
    let name = lease_name(node);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(PEER_NAMESPACE.to_owned()),
            annotations: Some(BTreeMap::from([(
                PEER_ADDRESS_ANNOTATION.to_owned(),
                address.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.as_str().to_owned()),
            ..Default::default()
        }),
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), PEER_NAMESPACE);
    // Forced: this node's driver is the only writer of its Lease, including after a restart
    // under another field manager's ownership.
    leases
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| {
            format!("advertising node {node}'s peer address in Lease {PEER_NAMESPACE}/{name}")
        })?;
    Ok(())
}

/// Where `node`'s peer server listens. `None`: the node has not advertised one.
pub async fn peer_address(client: &Client, node: &NodeName) -> anyhow::Result<Option<SocketAddr>> {
    let name = lease_name(node);
    let leases: Api<Lease> = Api::namespaced(client.clone(), PEER_NAMESPACE);
    let Some(lease) = leases
        .get_opt(&name)
        .await
        .with_context(|| format!("reading Lease {PEER_NAMESPACE}/{name}"))?
    else {
        return Ok(None);
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    if holder != Some(node.as_str()) {
        bail!("Lease {PEER_NAMESPACE}/{name} is held by {holder:?}, not by node {node}");
    }
    let Some(raw) = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PEER_ADDRESS_ANNOTATION))
    else {
        return Ok(None);
    };
    let address: SocketAddr = raw.parse().with_context(|| {
        format!(
            "Lease {PEER_NAMESPACE}/{name}: {PEER_ADDRESS_ANNOTATION} {raw:?} is not <ip>:<port>"
        )
    })?;
    if !usable(address) {
        bail!("Lease {PEER_NAMESPACE}/{name}: {PEER_ADDRESS_ANNOTATION} {address} is no address a peer can connect to");
    }
    Ok(Some(address))
}

/// The field manager of the transfers annotation: apart from the address's, so that applying
/// one never drops the other.
const TRANSFERS_MANAGER: &str = "kennel-peer-transfers";

/// Publish `node`'s pulls under way in its Lease (none: the annotation goes).
pub async fn publish_transfers(
    client: &Client,
    node: &NodeName,
    transfers: &[TransferStatus],
) -> anyhow::Result<()> {
    let name = lease_name(node);
    let annotations = (!transfers.is_empty()).then(|| {
        BTreeMap::from([(
            TRANSFERS_ANNOTATION.to_owned(),
            serde_json::to_string(transfers).unwrap_or_default(),
        )])
    });
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(PEER_NAMESPACE.to_owned()),
            annotations,
            ..Default::default()
        },
        spec: None,
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), PEER_NAMESPACE);
    leases
        .patch(
            &name,
            &PatchParams::apply(TRANSFERS_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| {
            format!("publishing node {node}'s transfers in Lease {PEER_NAMESPACE}/{name}")
        })?;
    Ok(())
}
