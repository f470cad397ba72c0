//! Whether the API server's own StatefulSet controller enforces the retention policy.
//!
//! Kubernetes enforces `persistentVolumeClaimRetentionPolicy` itself from 1.32 on (GA); 1.27–1.31
//! do it only when the `StatefulSetAutoDeletePVC` gate is on. Where it does, Kennel must not write
//! the basic owner references a second time from a different source of truth.

use std::str::FromStr;

/// `--builtin-retention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BuiltinMode {
    /// On when the API server reports version 1.32 or newer.
    Auto,
    /// The built-in controller enforces retention; Kennel only adds what it does not do.
    On,
    /// Kennel writes the owner references itself.
    Off,
}

/// First Kubernetes minor release where retention is always enforced.
const ALWAYS_ENFORCED_FROM: (u32, u32) = (1, 32);

impl BuiltinMode {
    /// Resolves `auto` against the server version (`major`, `minor` from `/version`).
    pub fn resolve(self, major: &str, minor: &str) -> bool {
        match self {
            BuiltinMode::On => true,
            BuiltinMode::Off => false,
            BuiltinMode::Auto => parse_version(major, minor)
                .map(|v| v >= ALWAYS_ENFORCED_FROM)
                .unwrap_or(false),
        }
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

    #[test]
    fn parses_provider_versions() {
        assert_eq!(parse_version("1", "32"), Some((1, 32)));
        assert_eq!(parse_version("1", "31+"), Some((1, 31)));
        assert_eq!(parse_version("1", ""), None);
    }

    #[test]
    fn auto_follows_the_server() {
        assert!(BuiltinMode::Auto.resolve("1", "32"));
        assert!(BuiltinMode::Auto.resolve("1", "33+"));
        assert!(BuiltinMode::Auto.resolve("2", "0"));
        assert!(!BuiltinMode::Auto.resolve("1", "31"));
        assert!(!BuiltinMode::Auto.resolve("1", "27+"));
        assert!(!BuiltinMode::Auto.resolve("garbage", "x"));
        assert!(BuiltinMode::On.resolve("1", "20"));
        assert!(!BuiltinMode::Off.resolve("1", "33"));
    }
}
