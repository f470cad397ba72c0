//! Whether Kubernetes' own StatefulSet controller enforces a set's retention policy.
//!
//! The `StatefulSetAutoDeletePVC` gate is alpha (off by default) in 1.23–1.26, beta and on by
//! default in 1.27–1.31, and GA (always on) from 1.32. The API server tells which is true for a
//! set: where the gate is on it defaults `spec.persistentVolumeClaimRetentionPolicy` on every
//! StatefulSet, and where it is off it drops the field. So, under `auto`:
//! - server 1.32 or newer: the built-in controller enforces every set's policy;
//! - server 1.23–1.31 (or a version that cannot be parsed): it enforces the policy of every set
//!   whose spec carries the field, and Kennel enforces (from its annotations) the policy of
//!   every set whose field was dropped;
//! - server older than 1.23: the field does not exist; Kennel enforces.
//!
//! Where the built-in controller enforces, Kennel never writes what it writes (claim owner
//! references): two writers of one list conflict.

use std::str::FromStr;

use k8s_openapi::api::apps::v1::StatefulSet;

/// `--builtin-retention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BuiltinMode {
    /// Decided per StatefulSet from what the API server keeps (see the README).
    Auto,
    /// The built-in controller enforces retention; Kennel only adds what it does not do.
    On,
    /// Kennel writes the owner references itself.
    Off,
}

/// The resolved rule for this API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinRule {
    /// Every set's policy is enforced by Kubernetes.
    Always,
    /// Kubernetes enforces exactly where the server kept the spec field.
    WhereFieldKept,
    /// Kennel enforces every set's policy.
    Never,
}

/// First release where the gate is locked on.
const GA_FROM: (u32, u32) = (1, 32);
/// First release that knows the field (gate alpha).
const FIELD_FROM: (u32, u32) = (1, 23);

impl BuiltinMode {
    /// Resolves the mode against the server version (`major`, `minor` from `/version`).
    pub fn resolve(self, major: &str, minor: &str) -> BuiltinRule {
        match self {
            BuiltinMode::On => BuiltinRule::Always,
            BuiltinMode::Off => BuiltinRule::Never,
            BuiltinMode::Auto => match parse_version(major, minor) {
                Some(v) if v >= GA_FROM => BuiltinRule::Always,
                Some(v) if v < FIELD_FROM => BuiltinRule::Never,
                _ => BuiltinRule::WhereFieldKept,
            },
        }
    }
}

impl BuiltinRule {
    /// Whether Kubernetes enforces `set`'s retention policy.
    pub fn enforces(self, set: &StatefulSet) -> bool {
        match self {
            BuiltinRule::Always => true,
            BuiltinRule::Never => false,
            BuiltinRule::WhereFieldKept => set
                .spec
                .as_ref()
                .is_some_and(|s| s.persistent_volume_claim_retention_policy.is_some()),
        }
    }

    /// For the start-up log line.
    pub fn describe(self) -> &'static str {
        match self {
            BuiltinRule::Always => "Kubernetes enforces every StatefulSet's retention policy; Kennel only adds its guards",
            BuiltinRule::WhereFieldKept => "Kubernetes enforces the policy of sets whose spec.persistentVolumeClaimRetentionPolicy the API server keeps (StatefulSetAutoDeletePVC on); Kennel enforces the annotations of sets where it was dropped",
            BuiltinRule::Never => "Kennel writes the claims' owner references itself",
        }
    }
}

/// `--builtin-retention=off` where the built-in controller cannot be turned off (1.32+) would
/// make Kennel a second writer of the claims' owner references: refused unless `forced` (a
/// cluster that runs without Kubernetes' StatefulSet controller).
pub fn check_off_allowed(
    mode: BuiltinMode,
    forced: bool,
    major: &str,
    minor: &str,
) -> Result<(), String> {
    if mode != BuiltinMode::Off || forced {
        return Ok(());
    }
    match parse_version(major, minor) {
        Some(v) if v >= GA_FROM => Err(format!(
            "--builtin-retention=off refused: on Kubernetes {major}.{minor} the StatefulSet controller always enforces persistentVolumeClaimRetentionPolicy (GA since 1.32), so Kennel would be a second writer of the same claims' owner references; use --builtin-retention=auto, or add --force-builtin-retention-off if this cluster runs without Kubernetes' StatefulSet controller"
        )),
        _ => Ok(()),
    }
}

/// Parses `/version`'s `major`/`minor`; providers append suffixes such as `32+`.
pub fn parse_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    fn leading_number(s: &str) -> Option<u32> {
        let digits: String = s.trim().chars().take_while(char::is_ascii_digit).collect();
        u32::from_str(&digits).ok()
    }
    Some((leading_number(major)?, leading_number(minor)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::fixtures::set;

    #[test]
    fn parses_provider_versions() {
        assert_eq!(parse_version("1", "32"), Some((1, 32)));
        assert_eq!(parse_version("1", "31+"), Some((1, 31)));
        assert_eq!(parse_version("1", ""), None);
    }

    #[test]
    fn auto_follows_the_gate_history() {
        use BuiltinRule::*;
        let auto = |major, minor| BuiltinMode::Auto.resolve(major, minor);
        assert_eq!(auto("1", "32"), Always);
        assert_eq!(auto("1", "33+"), Always);
        assert_eq!(auto("2", "0"), Always);
        // Beta, on by default, but an admin may have turned it off: the server tells per set.
        assert_eq!(auto("1", "28"), WhereFieldKept);
        assert_eq!(auto("1", "27+"), WhereFieldKept);
        assert_eq!(auto("1", "31"), WhereFieldKept);
        assert_eq!(auto("1", "23"), WhereFieldKept);
        assert_eq!(auto("garbage", "x"), WhereFieldKept);
        assert_eq!(auto("1", "22"), Never);
        assert_eq!(BuiltinMode::On.resolve("1", "20"), Always);
        assert_eq!(BuiltinMode::Off.resolve("1", "33"), Never);
    }

    #[test]
    fn off_is_refused_where_the_built_in_is_ga_unless_forced() {
        let off = BuiltinMode::Off;
        let err = check_off_allowed(off, false, "1", "36").expect_err("refused on 1.36");
        assert!(err.contains("--force-builtin-retention-off"), "{err}");
        assert!(check_off_allowed(off, false, "1", "32+").is_err());
        assert!(check_off_allowed(off, true, "1", "36").is_ok());
        // Before GA an administrator can turn the gate off: Kennel must then write.
        assert!(check_off_allowed(off, false, "1", "31").is_ok());
        assert!(check_off_allowed(off, false, "1", "28").is_ok());
        assert!(check_off_allowed(BuiltinMode::Auto, false, "1", "36").is_ok());
        assert!(check_off_allowed(BuiltinMode::On, false, "1", "36").is_ok());
    }

    #[test]
    fn a_kept_field_means_the_built_in_controller_enforces() {
        // What a 1.28 server with the gate on returns: the field defaulted to Retain/Retain.
        let kept = set(3, Some(("Retain", "Retain")));
        // What it returns with the gate off: the field dropped.
        let dropped = set(3, None);
        assert!(BuiltinRule::WhereFieldKept.enforces(&kept));
        assert!(!BuiltinRule::WhereFieldKept.enforces(&dropped));
        assert!(BuiltinRule::Always.enforces(&dropped));
        assert!(!BuiltinRule::Never.enforces(&kept));
    }
}
