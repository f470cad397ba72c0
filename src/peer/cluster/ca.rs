//! The cluster's CA, kept in the Secret `kennel-system/kennel-peer-ca`: the first driver to
//! start makes it, every other one (and every restart) loads it.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use super::api_code;
use crate::peer::pki::{ClusterCa, CA_SECRET_NAME, CA_SECRET_NAMESPACE, CA_SECRET_TYPE};

/// The CA in the cluster's Secret, made and stored first if there is none.
///
/// An existing Secret is never written: every node's certificate chains to it, so replacing
/// it would cut each node off from the others. One whose data is no usable CA is an error for
/// an operator to resolve (delete the Secret to rotate), not something to repair on a guess.
pub async fn load_or_create_ca(client: &Client) -> anyhow::Result<ClusterCa> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), CA_SECRET_NAMESPACE);
    if let Some(secret) = read(&secrets).await? {
        return from_secret(&secret);
    }
    let ca = ClusterCa::generate().context("generating the peer CA")?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET_NAME.to_owned()),
            namespace: Some(CA_SECRET_NAMESPACE.to_owned()),
            ..Default::default()
        },
        type_: Some(CA_SECRET_TYPE.to_owned()),
        data: Some(ca.to_secret_data()),
        // Nothing may change the key under the nodes' feet; rotation deletes the Secret.
        immutable: Some(true),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(
                secret = %format!("{CA_SECRET_NAMESPACE}/{CA_SECRET_NAME}"),
                "made the cluster's peer CA"
            );
            Ok(ca)
        }
        // Another node made it between our read and our create: theirs is the CA.
        Err(e) if api_code(&e) == Some(409) => match read(&secrets).await? {
            Some(secret) => from_secret(&secret),
            None => bail!(
                "Secret {CA_SECRET_NAMESPACE}/{CA_SECRET_NAME} already exists, yet reading it \
                 finds none"
            ),
        },
        Err(e) => Err(e)
            .with_context(|| format!("creating Secret {CA_SECRET_NAMESPACE}/{CA_SECRET_NAME}")),
    }
}

async fn read(secrets: &Api<Secret>) -> anyhow::Result<Option<Secret>> {
    secrets
        .get_opt(CA_SECRET_NAME)
        .await
        .with_context(|| format!("reading Secret {CA_SECRET_NAMESPACE}/{CA_SECRET_NAME}"))
}

fn from_secret(secret: &Secret) -> anyhow::Result<ClusterCa> {
    let none = BTreeMap::new();
    ClusterCa::from_secret_data(secret.data.as_ref().unwrap_or(&none)).with_context(|| {
        format!(
            "Secret {CA_SECRET_NAMESPACE}/{CA_SECRET_NAME} holds no usable peer CA; it is left \
             as it is: fix it, or delete it to have a new CA made (every node then needs a new \
             certificate)"
        )
    })
}
