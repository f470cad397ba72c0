//! Kubernetes object names as the peer channel meets them: a node name is the only identity a
//! peer certificate carries, and claim names travel in requests, so both are checked before use.

use std::fmt;

/// Longest DNS-1123 subdomain Kubernetes accepts (node names, claim names).
const MAX_SUBDOMAIN: usize = 253;
/// Longest DNS-1123 label (namespaces, and each dot-separated part of a subdomain).
const MAX_LABEL: usize = 63;

/// One DNS-1123 label: lowercase alphanumerics and `-`, alphanumeric at both ends.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters in all.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN && s.split('.').all(is_dns1123_label)
}

/// The name of a Kubernetes node, valid both for Kubernetes and as a certificate's DNS name.
///
/// Names TLS would read as an IP address (an all-numeric last label, `10.0.0.1`) are refused:
/// a peer certificate names its node by DNS name only, and such a name could not be verified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// Parse an untrusted node name; the error says why it cannot name a node.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !is_dns1123_subdomain(raw) {
            return Err(format!(
                "node name {raw:?} is not an RFC 1123 subdomain (lowercase alphanumerics, '-' and \
                 '.', at most 253 characters)"
            ));
        }
        if rustls_pki_types::DnsName::try_from(raw).is_err() {
            return Err(format!(
                "node name {raw:?} reads as an IP address, not a DNS name a certificate can carry"
            ));
        }
        Ok(NodeName(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_rfc_1123_and_dns() {
        for good in [
            "node-1",
            "worker.example.com",
            "ip-10-0-0-1.ec2.internal",
            "a",
            "1node",
            &"a".repeat(63),
        ] {
            assert_eq!(
                NodeName::parse(good).map(|n| n.to_string()),
                Ok(good.to_owned())
            );
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62)
        );
        assert_eq!(long.len(), 254);
        for bad in [
            "",
            "Node-1",
            "node_1",
            "-node",
            "node-",
            "node..x",
            ".node",
            "node.",
            "node/../x",
            "node 1",
            "nöde",
            "*.example.com",
            "10.0.0.1",
            "node.123",
            &"a".repeat(64),
            &long,
        ] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(NodeName::parse("10.0.0.1")
            .unwrap_err()
            .contains("IP address"));
        assert!(NodeName::parse("Node").unwrap_err().contains("RFC 1123"));
    }

    #[test]
    fn labels_are_single_and_short() {
        assert!(is_dns1123_label("kube-system"));
        assert!(!is_dns1123_label("kube.system"));
        assert!(!is_dns1123_label(&"n".repeat(64)));
        assert!(is_dns1123_subdomain("data-web-0"));
        assert!(!is_dns1123_subdomain("Data"));
    }
}
