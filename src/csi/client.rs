//! A CSI client over a Unix socket, for `kennel ctl`, the demo, the benchmark and tests.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::csi::pb::{
    controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient,
};
use crate::csi::server::socket_path;
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct CsiClient {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub group: GroupControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl CsiClient {
    pub async fn connect(endpoint: &str) -> Result<Self> {
        let path: PathBuf = socket_path(endpoint)?;
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://kennel.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|e| Error::Precondition(format!("cannot connect to {endpoint}: {e}")))?;
        Ok(CsiClient {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            group: GroupControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}
