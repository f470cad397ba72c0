//! Room in a VG's metadata area, and refusing a new LV that would not fit.
//!
//! lvm2 keeps the whole description of a VG (every LV, its tags included) as
//! text in a metadata area on each PV, 1020 KiB by default. A change writes
//! the new text beside the old one before switching to it, so one copy may use
//! at most half the area (lvm2 2.03: `(size - 512) / 2 - 512` bytes); past it
//! lvm2 refuses every change to the VG. Each Kennel LV adds about 470 bytes
//! (lvm2's own fields and Kennel's tags), so the default area holds about
//! 1,100 volumes.
//!
//! The index holds each VG's figure from its last load (`vgs -o
//! vg_mda_size,vg_mda_free`) less an estimate for every LV created since, so
//! the check costs no lvm2 command; only when the estimate says no is lvm2
//! asked again before refusing.

use std::sync::Mutex;

use super::cli::{Lvm, VgRow};
use super::index::Index;
use crate::error::{Error, Result};

/// lvm2's own text for one LV, tags aside, at most: id, status, flags,
/// creation time and host (up to 64 characters), allocation policy and one
/// segment (a thin one names its pool and origin). About 340 bytes for a
/// linear LV on a host with a short name.
const LV_SECTION_MAX: u64 = 480;
/// The same, at least (a linear LV, a one-letter host name).
const LV_SECTION_MIN: u64 = 300;
/// lvm2 also stores the command line of the last change (`description`),
/// replacing the one before: a create's may be this much longer than the
/// previous one's, plus its `--addtag` arguments.
const COMMAND_MAX: u64 = 256;
/// lvm2 aligns each copy to a 512-byte sector and reports free room in
/// whole sectors.
const SLACK: u64 = 1024;
/// What a volume as Kubernetes asks for one takes, measured (lvm2 2.03.16,
/// short host and node names): for the "about N volumes" of a message.
const TYPICAL_VOLUME: u64 = 470;

/// A VG's metadata area: its size and the room left for the text to grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Area {
    /// Bytes of the smallest metadata area of the VG (0: not reported).
    pub size: u64,
    /// Bytes the text may still grow by.
    pub free: u64,
}

impl Area {
    pub fn of(row: &VgRow) -> Area {
        Area {
            size: row.vg_mda_size,
            free: row.vg_mda_free,
        }
    }

    /// The largest text lvm2 writes into an area of this size.
    pub fn max_text(&self) -> u64 {
        (self.size.saturating_sub(512) / 2).saturating_sub(512)
    }

    /// An LV was added: its text is no longer free.
    pub fn take(&mut self, bytes: u64) {
        self.free = self.free.saturating_sub(bytes);
    }

    /// An LV was removed.
    pub fn give_back(&mut self, bytes: u64) {
        self.free = self.free.saturating_add(bytes).min(self.max_text());
    }
}

/// `tags = ["a", "b"]` as lvm2 writes it.
fn tags_bytes(tags: &[String]) -> u64 {
    if tags.is_empty() {
        return 0;
    }
    10 + tags.iter().map(|t| t.len() as u64 + 4).sum::<u64>()
}

/// What an LV with `tags` adds to its VG's metadata text, at most.
pub fn lv_bytes(tags: &[String]) -> u64 {
    LV_SECTION_MAX + tags_bytes(tags)
}

/// What removing an LV with `tags` takes off the text, at least.
pub fn lv_bytes_at_least(tags: &[String]) -> u64 {
    LV_SECTION_MIN + tags_bytes(tags)
}

/// Room the `lvcreate` of an LV with `tags` needs in the area.
pub fn needed(tags: &[String]) -> u64 {
    let arguments: u64 = tags.iter().map(|t| t.len() as u64 + 10).sum();
    lv_bytes(tags) + COMMAND_MAX + arguments + SLACK
}

/// Whether a new LV with `tags` fits in `vg`'s metadata area; if not, an
/// error saying what to do.
pub fn check(vg: &str, area: Area, tags: &[String]) -> Result<()> {
    let needed = needed(tags);
    // An area lvm2 did not report (an old lvm2): nothing to judge.
    if area.size == 0 || area.free >= needed {
        return Ok(());
    }
    Err(Error::Exhausted(format!(
        "the metadata area of volume group {vg} is full: lvm2 keeps two copies of the VG's \
         description there ({} KiB per PV, so at most {} KiB of text, about {} volumes), {} bytes \
         are left and a new volume needs about {needed}. Delete volumes or snapshots, or move \
         to a VG whose PVs have a larger area (`pvcreate --metadatasize` or `vgcreate \
         --metadatasize`, about 1 MiB per 1,000 volumes; an existing PV's area cannot grow): \
         see the README, \"Volumes per volume group\"",
        area.size / 1024,
        area.max_text() / 1024,
        area.max_text() / TYPICAL_VOLUME,
        area.free,
    )))
}

/// Refuse a new LV with `tags` in `vg` if its metadata area cannot take it.
/// Runs no lvm2 command unless the index's estimate says no: then lvm2's
/// figure is read (and kept) before refusing.
pub fn ensure_room(index: &Mutex<Index>, lvm: &Lvm, vg: &str, tags: &[String]) -> Result<()> {
    let lock = || index.lock().unwrap_or_else(|p| p.into_inner());
    let Some(estimate) = lock().vg(vg).map(|v| v.metadata) else {
        // Not indexed: the create reports the missing VG itself.
        return Ok(());
    };
    if check(vg, estimate, tags).is_ok() {
        return Ok(());
    }
    let fresh = lvm
        .vgs(&[vg.to_owned()])?
        .into_iter()
        .find(|row| row.vg_name == vg)
        .map(|row| Area::of(&row));
    let Some(area) = fresh else {
        return Ok(());
    };
    lock().set_metadata(vg, area);
    check(vg, area, tags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::lvm::tags;
    use crate::backend::VolumeRecord;
    use crate::model::spec::{AccessMode, AccessType, Capability, FsType, VolumeParams};
    use crate::model::volume_size::CapacityRange;
    use crate::model::VolumeId;

    /// lvm2's default: the first MiB of the PV less its label, 1020 KiB.
    const DEFAULT_AREA: u64 = 1_044_480;

    /// A volume as Kubernetes asks for them (csi-provisioner with
    /// --extra-create-metadata), on a node with a long cloud name.
    fn k8s_tags() -> Vec<String> {
        let name = "pvc-8f0e3c2a-1b2c-4d5e-9f00-123456789abc".to_owned();
        tags::encode(&VolumeRecord {
            id: VolumeId::generate(),
            name: name.clone(),
            capacity_bytes: 10 << 30,
            requested: CapacityRange {
                required: 10 << 30,
                limit: 0,
            },
            capabilities: vec![Capability {
                access_type: AccessType::Mount {
                    fs_type: Some(FsType::Ext4),
                    mount_flags: vec![],
                },
                access_mode: AccessMode::SingleNodeWriter,
            }],
            params: VolumeParams {
                mkfs_discard: false,
                pvc_name: Some("data-postgres-0".into()),
                pvc_namespace: Some("production".into()),
                pv_name: Some(name),
                backend: Default::default(),
                ..Default::default()
            },
            node_id: "ip-10-0-12-34.eu-west-1.compute.internal".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            created_unix: 1_796_250_875,
            source: None,
        })
        .expect("test setup")
    }

    #[test]
    fn the_limit_is_half_the_area_less_alignment() {
        let area = Area {
            size: DEFAULT_AREA,
            free: 0,
        };
        // lvm2 2.03.16 refuses a text of more than 521,472 bytes in it.
        assert_eq!(area.max_text(), 521_472);
        assert_eq!(Area::default().max_text(), 0);
    }

    #[test]
    fn the_estimate_covers_what_lvm2_writes_for_an_lv() {
        // lvm2 2.03.16 wrote 335 bytes for a linear Kennel LV (27-character name,
        // contiguous allocation) on host "vm", beside its tags; a host name has up
        // to 64 characters.
        let tags = k8s_tags();
        assert!(lv_bytes(&tags) >= 335 + 62 + tags_bytes(&tags));
        assert!(lv_bytes_at_least(&tags) <= 335 + tags_bytes(&tags));
        let line = "tags = [\"a\", \"bc\"]\n".len() as u64;
        assert!((line..line + 4).contains(&tags_bytes(&["a".to_owned(), "bc".to_owned()])));
    }

    #[test]
    fn a_full_area_is_refused_with_what_to_do_and_a_roomy_one_is_not() {
        let tags = k8s_tags();
        let need = needed(&tags);
        let area = |free| Area {
            size: DEFAULT_AREA,
            free,
        };
        assert!(check("vg0", area(need), &tags).is_ok());
        assert!(check("vg0", area(1 << 19), &tags).is_ok());
        match check("vg0", area(need - 1), &tags) {
            Err(Error::Exhausted(msg)) => {
                for part in [
                    "metadata area",
                    "vg0",
                    "1020 KiB",
                    "--metadatasize",
                    "README",
                ] {
                    assert!(msg.contains(part), "{part}: {msg}");
                }
            }
            other => panic!("{other:?}"),
        }
        // No figure from lvm2: no refusal on a guess.
        assert!(check("vg0", Area::default(), &tags).is_ok());
    }

    #[test]
    fn the_estimate_follows_creations_and_removals_conservatively() {
        let tags = k8s_tags();
        let mut area = Area {
            size: DEFAULT_AREA,
            free: 100_000,
        };
        area.take(lv_bytes(&tags));
        assert_eq!(area.free, 100_000 - lv_bytes(&tags));
        area.give_back(lv_bytes_at_least(&tags));
        assert!(
            area.free < 100_000,
            "a removal gives back no more than it surely freed"
        );
        area.take(u64::MAX);
        assert_eq!(area.free, 0);
        area.give_back(u64::MAX);
        assert_eq!(area.free, area.max_text());
    }
}
