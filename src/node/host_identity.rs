//! The host's identity, recorded with every volume so an administrator can tell which machine
//! made it. Never a constant: a placeholder shared by every host would make all hosts look
//! alike (or, compared with a real ID, all look replaced).

use std::fs;
use std::path::Path;

use tracing::warn;

use crate::error::{Error, Result};

/// Where systemd (and dbus, on older systems) keep the machine ID. The node DaemonSet mounts
/// the host's `/etc/machine-id` read-only: an image's own is empty or made at build time.
pub const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];
/// Changes on every boot: a fallback that is at least true of this host.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// The machine ID, else the boot ID (with a warning), else an error: the driver refuses to
/// start without a real identity.
pub fn host_identity() -> Result<String> {
    identity_from(&MACHINE_ID_FILES.map(Path::new), Path::new(BOOT_ID_FILE))
}

/// As `host_identity`, reading the machine ID from `files` instead (all of
/// `MACHINE_ID_FILES` when empty).
pub fn host_identity_from(files: &[std::path::PathBuf]) -> Result<String> {
    if files.is_empty() {
        return host_identity();
    }
    let files: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    identity_from(&files, Path::new(BOOT_ID_FILE))
}

fn identity_from(machine_id_files: &[&Path], boot_id_file: &Path) -> Result<String> {
    if let Some(id) = machine_id_files.iter().find_map(|p| read_id(p)) {
        return Ok(id);
    }
    if let Some(id) = read_id(boot_id_file) {
        warn!(
            boot_id = %id,
            "no machine ID in {}: using the boot ID, which changes on reboot (mount the host's /etc/machine-id)",
            machine_id_files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        );
        return Ok(id);
    }
    Err(Error::Precondition(format!(
        "this host has no identity: {} and {} are missing or empty; mount the host's /etc/machine-id into the driver's container",
        machine_id_files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        boot_id_file.display()
    )))
}

/// A machine or boot ID: hexadecimal digits (dashes allowed, as in the boot ID), not all zero.
fn read_id(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let id = text.trim();
    let digits = id.chars().filter(|c| *c != '-');
    let valid = id.len() >= 16
        && digits.clone().all(|c| c.is_ascii_hexdigit())
        && digits.clone().any(|c| c != '0');
    valid.then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_id_first_then_boot_id_then_refusal() {
        let dir = tempfile::tempdir().expect("test setup");
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            fs::write(&p, text).expect("test setup");
            p
        };
        let empty = file("empty", "\n");
        let placeholder = file("placeholder", "unknown\n");
        let zeros = file("zeros", "00000000000000000000000000000000\n");
        let missing = dir.path().join("missing");
        let machine = file("machine", "0123456789abcdef0123456789abcdef\n");
        let boot = file("boot", "6a1f2c3d-1111-4e2a-9bcd-0123456789ab\n");

        let ok = identity_from(&[&empty, &machine], &boot).expect("test setup");
        assert_eq!(ok, "0123456789abcdef0123456789abcdef");
        let fallback =
            identity_from(&[&missing, &empty, &placeholder, &zeros], &boot).expect("test setup");
        assert_eq!(fallback, "6a1f2c3d-1111-4e2a-9bcd-0123456789ab");
        let err = identity_from(&[&empty], &missing).expect_err("an error");
        assert!(
            matches!(&err, Error::Precondition(m) if m.contains("/etc/machine-id")),
            "{err:?}"
        );
    }

    #[test]
    fn named_files_replace_the_default_locations() {
        let dir = tempfile::tempdir().expect("test setup");
        let machine = dir.path().join("machine-id");
        fs::write(&machine, "0123456789abcdef0123456789abcdef\n").expect("test setup");
        let id = host_identity_from(std::slice::from_ref(&machine)).expect("named file");
        assert_eq!(id, "0123456789abcdef0123456789abcdef");
        // A host without the file (the DaemonSet mounts its /etc): the boot ID, not an error.
        let boot = fs::read_to_string(BOOT_ID_FILE).expect("boot id");
        let id = host_identity_from(&[dir.path().join("missing")]).expect("boot ID fallback");
        assert_eq!(id, boot.trim());
        assert_eq!(host_identity_from(&[]).ok(), host_identity().ok());
    }

    #[test]
    fn this_host_has_an_identity() {
        let id = host_identity().expect("a Linux host has at least a boot ID");
        assert_ne!(id, "unknown");
        assert!(id.len() >= 16);
    }
}
