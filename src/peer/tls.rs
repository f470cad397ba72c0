//! Mutual TLS for the peer channel: both ends present a certificate of the cluster's peer CA,
//! the client checks that the server is the node it meant to call, and the server learns who
//! calls from the client's certificate, never from the request.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::name::NodeName;
use super::pki::NodeIdentity;

/// A client that opens TCP and never finishes its handshake holds no server task longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// This node's TLS identity and the CA every peer must chain to.
#[derive(Clone)]
pub struct PeerTls {
    node: NodeName,
    identity: Identity,
    ca: Certificate,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    pub fn new(identity: &NodeIdentity) -> Self {
        PeerTls {
            node: identity.node.clone(),
            identity: Identity::from_pem(&identity.cert_pem, &identity.key_pem),
            ca: Certificate::from_pem(&identity.ca_pem),
        }
    }

    /// The node this identity names.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// Server side: a client certificate chained to the CA is required.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Client side: the server must chain to the CA and be named `peer`, whatever address
    /// was dialled.
    pub fn client_config(&self, peer: &NodeName) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(peer.as_str())
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// The node a certificate names: exactly one subject alternative name, a valid node name.
/// Anything else (no SAN, several names, an IP or URI) names no single node.
pub fn node_of_certificate(der: &[u8]) -> Result<NodeName, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the peer certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the peer certificate's names do not parse: {e}"))?
        .ok_or("the peer certificate names no node")?;
    match san.value.general_names.as_slice() {
        [GeneralName::DNSName(name)] => NodeName::parse(name),
        names => Err(format!(
            "the peer certificate must name exactly one node, it names {names:?}"
        )),
    }
}

/// The calling node, from the certificate TLS verified for this connection.
pub fn caller_node<T>(request: &Request<T>) -> Result<NodeName, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
    node_of_certificate(leaf).map_err(Status::unauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::pki::ClusterCa;
    use rcgen::{CertificateParams, KeyPair};

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    #[test]
    fn an_issued_certificate_names_its_node() {
        let ca = ClusterCa::generate().unwrap();
        let id = ca.issue_node("node-b.cluster").unwrap();
        assert_eq!(
            node_of_certificate(&der(&id.cert_pem)).unwrap().as_str(),
            "node-b.cluster"
        );
        assert_eq!(PeerTls::new(&id).node().as_str(), "node-b.cluster");
    }

    #[test]
    fn certificates_naming_no_single_node_are_refused() {
        let key = KeyPair::generate().unwrap();
        let cert = |sans: &[&str]| {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            CertificateParams::new(sans)
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        for (sans, why) in [
            (&[][..], "names no node"),
            (&["node-a", "node-b"][..], "exactly one node"),
            (&["10.0.0.1"][..], "exactly one node"),
            (&["Node-A"][..], "RFC 1123"),
        ] {
            let err = node_of_certificate(&cert(sans)).unwrap_err();
            assert!(err.contains(why), "{sans:?}: {err}");
        }
        assert_eq!(
            node_of_certificate(&cert(&["node-a"])).unwrap().as_str(),
            "node-a"
        );
        assert!(node_of_certificate(b"garbage")
            .unwrap_err()
            .contains("does not parse"));
    }

    #[test]
    fn a_request_without_a_certificate_is_unauthenticated() {
        let status = caller_node(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
