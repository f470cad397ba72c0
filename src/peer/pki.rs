//! The cluster's peer CA and the node certificates it issues.
//!
//! Keys are made once per cluster and kept in a Kubernetes Secret, never in git: a leaked image
//! or repository then opens no cluster's channel. A node certificate carries one identity, the
//! node's name, and lives a bounded time, so a stolen one stops working on its own.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use super::name::NodeName;

/// Where the CA lives: a `kubernetes.io/tls` Secret with `tls.crt` and `tls.key`.
pub const CA_SECRET_NAMESPACE: &str = "kennel-system";
pub const CA_SECRET_NAME: &str = "kennel-peer-ca";
pub const CA_SECRET_TYPE: &str = "kubernetes.io/tls";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// How long a CA and a node certificate are valid. A node renews its certificate well within
/// its lifetime; the CA is rotated by replacing the Secret.
pub const CA_VALIDITY: Duration = Duration::days(365);
pub const NODE_VALIDITY: Duration = Duration::days(30);
/// Certificates start a little in the past, so a peer whose clock lags accepts them at once.
const CLOCK_SKEW: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    InvalidNodeName(String),
    #[error("peer CA: {0}")]
    BadCa(String),
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
}

/// The cluster's peer CA: signs node certificates; its certificate is every node's trust root.
pub struct ClusterCa {
    cert_pem: String,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A node's TLS identity: its certificate and key, and the CA that every peer must chain to.
#[derive(Clone)]
pub struct NodeIdentity {
    pub node: NodeName,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// When the certificate expires: renew (issue again) before then.
    pub not_after: SystemTime,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn ecdsa_p256() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kennel");
    dn.push(DnType::CommonName, name);
    dn
}

impl ClusterCa {
    /// A fresh CA (ECDSA P-256), valid for [`CA_VALIDITY`] from now.
    pub fn generate() -> Result<Self, PkiError> {
        let key = ecdsa_p256()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name("kennel peer CA");
        // Signs node certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Load a CA from PEM. Refuses a certificate that is no CA, has expired, or whose public
    /// key is not the given key's: every certificate it issued would fail on the peer.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::BadCa(format!("{TLS_KEY} is not a usable private key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| PkiError::BadCa(format!("{TLS_CRT} is not a PEM certificate: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| PkiError::BadCa(format!("{TLS_CRT} is not an X.509 certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(PkiError::BadCa(format!(
                "{TLS_CRT} is not a CA certificate"
            )));
        }
        if !cert.validity().is_valid() {
            return Err(PkiError::BadCa(format!(
                "{TLS_CRT} is not valid now (valid {} to {}): rotate the Secret",
                cert.validity().not_before,
                cert.validity().not_after
            )));
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::BadCa(format!(
                "{TLS_KEY} is not the key of the certificate in {TLS_CRT}"
            )));
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_owned(),
            not_after,
            issuer,
        })
    }

    /// The CA from the `data` of the `kennel-peer-ca` Secret.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, PkiError> {
        let field = |key: &str| -> Result<&str, PkiError> {
            let bytes = data
                .get(key)
                .ok_or_else(|| PkiError::BadCa(format!("the Secret has no {key}")))?;
            std::str::from_utf8(&bytes.0)
                .map_err(|_| PkiError::BadCa(format!("the Secret's {key} is not PEM text")))
        };
        Self::from_pem(field(TLS_CRT)?, field(TLS_KEY)?)
    }

    /// The `data` of a `kubernetes.io/tls` Secret holding this CA.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (
                TLS_CRT.to_owned(),
                ByteString(self.cert_pem.clone().into_bytes()),
            ),
            (
                TLS_KEY.to_owned(),
                ByteString(self.issuer.key().serialize_pem().into_bytes()),
            ),
        ])
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `node_name` (its only name, as a DNS SAN), valid for client and server
    /// authentication for [`NODE_VALIDITY`], never past the CA's own expiry.
    pub fn issue_node(&self, node_name: &str) -> Result<NodeIdentity, PkiError> {
        let node = NodeName::parse(node_name).map_err(PkiError::InvalidNodeName)?;
        let key = ecdsa_p256()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(node.as_str());
        let dns = node.as_str().to_owned().try_into()?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + NODE_VALIDITY).min(self.not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeIdentity {
            node,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
            not_after: params.not_after.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{parse_x509_certificate, X509Certificate};

    fn der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect()
    }

    #[test]
    fn node_certificate_names_the_node_and_chains_to_the_ca() {
        let ca = ClusterCa::generate().unwrap();
        let id = ca.issue_node("worker-2.example").unwrap();
        assert_eq!(id.node.as_str(), "worker-2.example");
        assert_eq!(id.ca_pem, ca.cert_pem());
        let ca_der = der(ca.cert_pem());
        let leaf_der = der(&id.cert_pem);
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        let (_, leaf) = parse_x509_certificate(&leaf_der).unwrap();
        assert!(ca_cert.is_ca());
        assert!(!leaf.is_ca());
        assert_eq!(dns_names(&leaf), ["worker-2.example"]);
        assert_eq!(leaf.issuer(), ca_cert.subject());
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        // Another CA's key does not verify it.
        let other = ClusterCa::generate().unwrap();
        let other_der = der(other.cert_pem());
        let (_, other_cert) = parse_x509_certificate(&other_der).unwrap();
        assert!(leaf
            .verify_signature(Some(other_cert.public_key()))
            .is_err());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // Bounded life: about 30 days for the node, a year for the CA.
        let life = |c: &X509Certificate<'_>| {
            c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
        };
        let day = 86_400;
        assert!(
            (30 * day..=30 * day + 600).contains(&life(&leaf)),
            "{}",
            life(&leaf)
        );
        assert!((365 * day..=365 * day + 600).contains(&life(&ca_cert)));
        assert!(leaf.validity().is_valid());
        let key = KeyPair::from_pem(&id.key_pem).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    #[test]
    fn invalid_node_names_get_no_certificate() {
        let ca = ClusterCa::generate().unwrap();
        for bad in ["", "Node", "node_1", "a/b", "10.0.0.1", "x..y", "*.nodes"] {
            match ca.issue_node(bad) {
                Err(PkiError::InvalidNodeName(_)) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn secret_round_trip_keeps_the_same_ca() {
        let ca = ClusterCa::generate().unwrap();
        let data = ca.to_secret_data();
        assert_eq!(data.keys().collect::<Vec<_>>(), [TLS_CRT, TLS_KEY]);
        let loaded = ClusterCa::from_secret_data(&data).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        // What the loaded CA issues chains to the original certificate.
        let leaf_der = der(&loaded.issue_node("node-a").unwrap().cert_pem);
        let (_, leaf) = parse_x509_certificate(&leaf_der).unwrap();
        let ca_der = der(ca.cert_pem());
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
    }

    #[test]
    fn broken_secrets_are_refused() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let good = ca.to_secret_data();
        let refused = |data: BTreeMap<String, ByteString>, why: &str| {
            let err = ClusterCa::from_secret_data(&data).unwrap_err().to_string();
            assert!(err.contains(why), "{err:?} should say {why:?}");
        };
        let mut missing = good.clone();
        missing.remove(TLS_KEY);
        refused(missing, "no tls.key");
        let mut swapped = good.clone();
        swapped.insert(TLS_KEY.to_owned(), other.to_secret_data()[TLS_KEY].clone());
        refused(swapped, "not the key");
        let mut garbage = good.clone();
        garbage.insert(TLS_CRT.to_owned(), ByteString(b"not a cert".to_vec()));
        refused(garbage, "not a PEM certificate");
        // A node certificate is not a CA, even with its own key.
        let leaf = ca.issue_node("node-a").unwrap();
        let err = ClusterCa::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn an_expired_ca_is_refused() {
        let key = ecdsa_p256().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(400);
        params.not_after = now - Duration::days(35);
        let cert = params.self_signed(&key).unwrap();
        let err = ClusterCa::from_pem(&cert.pem(), &key.serialize_pem()).unwrap_err();
        assert!(err.to_string().contains("rotate the Secret"), "{err}");
    }
}
