//! Snapshot IDs as the CO sees them: `ks-…@<node>`, naming the node whose storage holds the
//! snapshot, so that a driver asked to restore it knows whether the bytes are here and, if
//! not, where. The backend knows snapshots by their bare `ks-…` ID only.
//!
//! IDs made before nodes were named (`ks-…` alone) keep working: they are this node's. A node
//! whose name would push the ID past CSI's 128-byte limit for strings (or that is no valid node
//! name) hands out bare IDs, which only it can restore.

use crate::error::{Error, Result};
use crate::model::SnapshotId;
use crate::peer::NodeName;

/// CSI's size limit for a string field.
const MAX_CSI_STRING: usize = 128;
const SEPARATOR: char = '@';

/// Where a snapshot named by a CSI request lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// On this node (its ID names this node, or no node at all).
    Here(SnapshotId),
    /// On another node.
    Elsewhere { id: SnapshotId, node: NodeName },
}

/// The ID the CO is given for snapshot `id` held by `node`.
pub fn handle(id: &SnapshotId, node: &str) -> String {
    let named = format!("{id}{SEPARATOR}{node}");
    if named.len() <= MAX_CSI_STRING && NodeName::parse(node).is_ok() {
        named
    } else {
        id.to_string()
    }
}

/// Where the snapshot `raw` (from a request: untrusted) lives, seen from `this_node`.
/// `None`: no Kennel snapshot can have this ID.
pub fn locate(raw: &str, this_node: &str) -> Option<Located> {
    let (id, node) = match raw.split_once(SEPARATOR) {
        Some((id, node)) => (id, Some(node)),
        None => (raw, None),
    };
    let id = SnapshotId::parse(id)?;
    match node {
        None => Some(Located::Here(id)),
        Some(node) if node == this_node => Some(Located::Here(id)),
        Some(node) => NodeName::parse(node)
            .ok()
            .map(|node| Located::Elsewhere { id, node }),
    }
}

/// The local ID of a snapshot this node must hold: a snapshot of another node is refused
/// with a message that names it (its data is not here, and this node must not act on it).
pub fn local(raw: &str, this_node: &str) -> Result<Option<SnapshotId>> {
    match locate(raw, this_node) {
        None => Ok(None),
        Some(Located::Here(id)) => Ok(Some(id)),
        Some(Located::Elsewhere { id, node }) => Err(Error::Precondition(format!(
            "snapshot {id} is held by node {node}, not by this node ({this_node}); only node \
             {node}'s driver can act on it"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SnapshotId {
        SnapshotId::parse("ks-0a1b2c3d4e5f6g7h8i9j0k1l").expect("test setup")
    }

    #[test]
    fn ids_name_their_node_and_read_back() {
        let raw = handle(&id(), "node-a");
        assert_eq!(raw, "ks-0a1b2c3d4e5f6g7h8i9j0k1l@node-a");
        assert_eq!(locate(&raw, "node-a"), Some(Located::Here(id())));
        assert_eq!(
            locate(&raw, "node-b"),
            Some(Located::Elsewhere {
                id: id(),
                node: NodeName::parse("node-a").expect("test setup"),
            })
        );
    }

    #[test]
    fn ids_made_before_nodes_were_named_are_this_nodes() {
        assert_eq!(
            locate("ks-0a1b2c3d4e5f6g7h8i9j0k1l", "node-b"),
            Some(Located::Here(id()))
        );
        assert_eq!(
            local("ks-0a1b2c3d4e5f6g7h8i9j0k1l", "node-b").expect("local"),
            Some(id())
        );
    }

    #[test]
    fn a_node_name_too_long_or_invalid_gives_a_bare_id() {
        let long = format!("n{}", ".n".repeat(60));
        assert!(NodeName::parse(&long).is_ok());
        assert_eq!(handle(&id(), &long), id().to_string());
        assert_eq!(handle(&id(), "Node_A"), id().to_string());
        // 100 bytes of node name is the most that fits.
        let longest = format!("{}.{}", "a".repeat(63), "b".repeat(36));
        assert_eq!(handle(&id(), &longest).len(), MAX_CSI_STRING);
    }

    #[test]
    fn hostile_ids_locate_nowhere() {
        for raw in [
            "",
            "@node-a",
            "ks-0a1b2c3d4e5f6g7h8i9j0k1l@",
            "ks-0a1b2c3d4e5f6g7h8i9j0k1l@../../etc",
            "ks-0a1b2c3d4e5f6g7h8i9j0k1l@Node-A",
            "ks-0a1b2c3d4e5f6g7h8i9j0k1l@node-a@node-b",
            "ks-../../etc@node-a",
            "kv-0a1b2c3d4e5f6g7h8i9j0k1l@node-a",
        ] {
            assert_eq!(locate(raw, "node-a"), None, "{raw:?}");
            assert_eq!(local(raw, "node-a").expect("no error"), None, "{raw:?}");
        }
    }

    #[test]
    fn another_nodes_snapshot_is_refused_by_name() {
        let err = local("ks-0a1b2c3d4e5f6g7h8i9j0k1l@node-a", "node-b").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        assert!(text.contains("held by node node-a"), "{text}");
    }
}
