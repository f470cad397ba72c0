//! SELinux mount options: the kubelet mounts a volume with
//! `-o context="user:role:type:level"` when the CSIDriver sets `seLinuxMount`,
//! so the whole filesystem gets the pod's label without a recursive relabel.
//! The label is checked to be exactly that, so nothing else can ride along
//! in it; the kernel (its SELinux module) does the rest.

use std::path::Path;

use crate::error::{Error, Result};

/// Options that carry an SELinux label.
const LABEL_OPTIONS: [&str; 4] = ["context", "fscontext", "defcontext", "rootcontext"];

/// Whether `option` (one mount option) is an SELinux label option.
pub fn is_label_option(option: &str) -> bool {
    option
        .split_once('=')
        .is_some_and(|(key, _)| LABEL_OPTIONS.contains(&key))
}

/// Check `option` (`context="…"` or `context=…`) is a well-formed label
/// option: `user:role:type[:level]`, quoted when the level lists categories.
pub fn check_label_option(option: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::invalid(format!("mount option {option:?}: {why}")));
    let Some((key, value)) = option.split_once('=') else {
        return refuse("no label");
    };
    if !LABEL_OPTIONS.contains(&key) {
        return refuse("not an SELinux label option");
    }
    let label = match value.strip_prefix('"') {
        Some(rest) => match rest.strip_suffix('"') {
            Some(inner) => inner,
            None => return refuse("unbalanced quotes"),
        },
        None => value,
    };
    if value == label && label.contains(',') {
        return refuse("a label with categories must be quoted");
    }
    let mut parts = label.splitn(4, ':');
    let names = [parts.next(), parts.next(), parts.next()];
    if !names
        .iter()
        .all(|p| p.is_some_and(|p| !p.is_empty() && p.chars().all(is_name_char)))
    {
        return refuse("an SELinux label is user:role:type[:level]");
    }
    if let Some(level) = parts.next() {
        if !is_level(level) {
            return refuse("the level is not s<N>[-s<N>][:categories]");
        }
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'
}

/// `s0`, `s0-s3`, `s0:c1,c2`, `s0-s0:c0.c1023`: MLS/MCS levels.
fn is_level(level: &str) -> bool {
    let numbered = |s: &str, prefix: char| {
        s.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.len() <= 5 && n.chars().all(|c| c.is_ascii_digit()))
    };
    let sensitivities = |range: &str| match range.split_once('-') {
        Some((low, high)) => numbered(low, 's') && numbered(high, 's'),
        None => numbered(range, 's'),
    };
    let categories = |set: &str| {
        set.split(',').all(|item| match item.split_once('.') {
            Some((low, high)) => numbered(low, 'c') && numbered(high, 'c'),
            None => numbered(item, 'c'),
        })
    };
    match level.split_once(':') {
        Some((range, set)) => sensitivities(range) && categories(set),
        None => sensitivities(level),
    }
}

/// Whether this node's kernel enforces or at least runs SELinux.
pub fn enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_the_kubelet_sends_are_accepted() {
        for ok in [
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
            "context=\"system_u:object_r:container_file_t:s0:c0.c1023\"",
            "context=system_u:object_r:container_file_t:s0",
            "context=\"system_u:object_r:container_file_t:s0-s0:c5,c10\"",
            "context=\"unconfined_u:object_r:svirt_sandbox_file_t\"",
            "fscontext=\"system_u:object_r:nfs_t:s0\"",
        ] {
            check_label_option(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(is_label_option(ok));
        }
    }

    #[test]
    fn nothing_else_rides_along_in_a_label() {
        for bad in [
            "context=\"system_u:object_r:t:s0:c1,nosuid\"",
            "context=\"system_u:object_r:t:s0\",exec",
            "context=\"system_u:object_r:t:s0",
            "context=system_u:object_r:t:s0:c1,c2",
            "context=\"system_u:object_r\"",
            "context=\"a b:object_r:t:s0\"",
            "context=\"system_u:object_r:t:s0:c1=c2\"",
            "context=\"system_u:object_r:t:x0\"",
            "context=\"\"",
            "context=",
        ] {
            assert!(check_label_option(bad).is_err(), "{bad} accepted");
        }
        assert!(!is_label_option("data=ordered"));
    }
}
