//! Snapshots on LVM: one volume's, and a group's cut at one instant.
//!
//! A thin volume's snapshot is a thin snapshot (`lvcreate -s`, instant); a linear volume's is
//! a full copy into a pending LV (see `copies`). lvm2's `lvcreate` takes one origin per call,
//! so a group cannot be cut by one lvm2 command: its members are cut one after another while
//! the filesystems of every staged member are frozen together, which makes the group one
//! instant for every writer. All or nothing: a member that fails removes the members made
//! before it.
//!
//! lvm2 suspends a thin origin for its snapshot, and device-mapper's suspend freezes the
//! filesystem on it once more: that nests inside our freeze only on kernels whose freezes
//! nest; older ones answer EBUSY and the group fails whole.

use super::allocation::add_tags;
use super::copies::Quiesce;
use super::index::Lv;
use super::params::{Layout, LvmParams};
use super::{tags, LvmBackend};
use crate::backend::{SnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};
use crate::node::freeze;

impl LvmBackend {
    /// Make the LV of `snapshot` from the volume LV `src` (whose record is `record`), tagged
    /// with `tag_list`.
    pub(super) fn cut_snapshot(
        &self,
        snapshot: &SnapshotRecord,
        src: &Lv,
        record: &VolumeRecord,
        tag_list: &[String],
        quiesce: Quiesce,
    ) -> Result<()> {
        let name = snapshot.id.as_str();
        if src.row.is_thin() {
            // lvm2 suspends the origin for the instant of the snapshot, flushing it.
            let _building = self.building(name);
            let cmd = self
                .lvm
                .cmd("lvcreate")
                .args(["-s", "-y", "-n"])
                .arg(name)
                .arg(format!("{}/{}", src.row.vg_name, src.row.lv_name));
            self.lvm.change(add_tags(cmd, tag_list, false))?;
            return self.reload();
        }
        // A linear volume: a full copy into a linear LV of its size.
        let mut params = LvmParams::parse(&record.params.backend)?;
        params.layout = Layout::Linear;
        params.stripes = None;
        params.stripe_size = None;
        self.build_copy(
            &src.row.vg_name.clone(),
            name,
            src.row.lv_size,
            &params,
            (src, quiesce),
            tag_list,
        )
    }

    /// See [`crate::backend::Backend::create_group_snapshot`].
    pub(super) fn group_snapshot(&self, members: &[SnapshotRecord]) -> Result<()> {
        let _change = self.changing();
        let present = members
            .iter()
            .filter(|m| self.index().find(m.id.as_str()).is_some())
            .count();
        if present == members.len() {
            return Ok(());
        }
        if present > 0 {
            return Err(Error::Internal(
                "part of this group snapshot exists already; delete it and cut it again".into(),
            ));
        }
        let mut sources = Vec::with_capacity(members.len());
        for member in members {
            let (src, record) = self
                .volume(&member.source_volume)?
                .ok_or_else(|| Error::VolumeNotFound(member.source_volume.to_string()))?;
            let tag_list = tags::encode(member)?;
            super::metadata::ensure_room(&self.index, &self.lvm, &src.row.vg_name, &tag_list)?;
            sources.push((src, record, tag_list));
        }
        let mut mounted = Vec::new();
        for (src, _, _) in &sources {
            mounted.extend(self.mounted_at(src)?);
        }
        let done = freeze::while_all_frozen(&mounted, || {
            crate::faults::step("group snapshot: all frozen");
            for (member, (src, record, tag_list)) in members.iter().zip(&sources) {
                self.cut_snapshot(member, src, record, tag_list, Quiesce::Held)?;
            }
            crate::faults::step("group snapshot: all cut, still frozen");
            Ok(())
        });
        if done.is_err() {
            for member in members {
                let made = self.lookup(member.id.as_str());
                if let Ok(Some(lv)) = made {
                    if let Err(e) = self.remove_lv(&lv) {
                        tracing::error!(snapshot_id = %member.id, error = %e, "cannot remove a member of a failed group snapshot; a retry of the group, or its deletion, removes it");
                    }
                }
            }
        }
        done
    }
}
