//! Kennel's picture of its volume groups, held in memory: every LV (its
//! record decoded from its tags, its activation, where its extents are) and
//! every PV's free extents.
//!
//! LV tags stay the only persistent state; the index is rebuilt from one
//! round of reports at start-up and is authoritative afterwards because the
//! driver is the only writer of Kennel's LVs in its VGs (it holds the per-VG
//! lock). Lookups, listings and stats read it and run no lvm2 command.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::cli::{LvRow, LvSegRow, PvSegRow, SegRow, VgRow};
use super::data::{self, PeRange};
use super::metadata;
use super::tags::{self, Decoded, LvFacts};
use crate::backend::{SnapshotRecord, VolumeRecord};
use crate::model::{SnapshotId, VolumeId};

/// A run of free extents on one PV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extents {
    pub first: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pv {
    /// As lvm2 names it (what `--devices` and PV ranges take).
    pub name: String,
    /// Byte offset of extent 0.
    pub pe_start: u64,
    /// Free runs, sorted, never adjacent.
    pub free: Vec<Extents>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vg {
    pub extent_size: u64,
    pub size: u64,
    pub free_extents: u64,
    /// PVs in the VG's metadata, found or not (see [`Index::lacks_pvs`]).
    pub pv_count: u64,
    /// The PVs found.
    pub pvs: Vec<Pv>,
    /// Its metadata area as lvm2 last reported it, less what Kennel's LVs
    /// added since (an estimate until the next load).
    pub metadata: metadata::Area,
}

/// What an LV is to Kennel.
// One per LV, held in place in the index: boxing the record would only add a pointer chase.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Volume(VolumeRecord),
    Snapshot(SnapshotRecord),
    /// Kennel's, its creation unfinished (see `tags`).
    Pending,
    /// Kennel's owner tag but a record that does not decode: reported, skipped.
    Corrupt(String),
    /// Not Kennel's (thin pools, a human's LVs): never touched.
    Foreign,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    pub row: LvRow,
    pub kind: Kind,
    /// The single PV range holding the LV, or why it has none.
    pub place: Result<PeRange, String>,
    /// Gone from lvm2's reports (removed behind the driver's back).
    pub missing: bool,
}

impl Lv {
    pub fn new(row: LvRow, segments: &[SegRow]) -> Lv {
        let place = data::contiguous_range(segments);
        let kind = kind_of(&row);
        Lv {
            row,
            kind,
            place,
            missing: false,
        }
    }

    pub fn is_owned(&self) -> bool {
        !matches!(self.kind, Kind::Foreign)
    }

    pub fn volume(&self) -> Option<&VolumeRecord> {
        match &self.kind {
            Kind::Volume(r) => Some(r),
            _ => None,
        }
    }

    pub fn snapshot(&self) -> Option<&SnapshotRecord> {
        match &self.kind {
            Kind::Snapshot(s) => Some(s),
            _ => None,
        }
    }
}

fn kind_of(row: &LvRow) -> Kind {
    let broken = |why: String| {
        tracing::error!(lv = %row.lv_name, vg = %row.vg_name, error = %why, "Kennel LV with unreadable tags; skipped");
        Kind::Corrupt(why)
    };
    let facts = LvFacts {
        name: &row.lv_name,
        size: row.lv_size,
    };
    if let Some(id) = VolumeId::parse(&row.lv_name) {
        return match tags::decode::<VolumeRecord>(&row.lv_tags, facts) {
            Ok(Decoded::Record(mut record)) if record.id == id => {
                record.capacity_bytes = row.lv_size;
                record.params.io_limits =
                    super::io_limits_tag::from_tags(&row.lv_name, &row.lv_tags);
                Kind::Volume(record)
            }
            Ok(Decoded::Record(_)) => broken("the record names another volume".to_owned()),
            Err(e) => broken(e.to_string()),
            Ok(Decoded::Pending) => Kind::Pending,
            Ok(Decoded::Foreign) => Kind::Foreign,
        };
    }
    if let Some(id) = SnapshotId::parse(&row.lv_name) {
        return match tags::decode::<SnapshotRecord>(&row.lv_tags, facts) {
            Ok(Decoded::Record(record)) if record.id == id => Kind::Snapshot(record),
            Ok(Decoded::Record(_)) => broken("the record names another snapshot".to_owned()),
            Err(e) => broken(e.to_string()),
            Ok(Decoded::Pending) => Kind::Pending,
            Ok(Decoded::Foreign) => Kind::Foreign,
        };
    }
    if tags::is_owned(&row.lv_tags) {
        if row.lv_tags.iter().any(|t| t == tags::PENDING) {
            return Kind::Pending;
        }
        return broken("an owned LV whose name is no Kennel ID".to_owned());
    }
    Kind::Foreign
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Index {
    vgs: BTreeMap<String, Vg>,
    lvs: BTreeMap<(String, String), Lv>,
    /// Extents taken for an LV whose `lvcreate` has not been indexed yet: a
    /// reload meanwhile may read them as free, and must not offer them again.
    reserved: Vec<(String, PeRange)>,
}

impl Index {
    /// Build from the three reports of one round (`vgs`, `pvs --segments`,
    /// `lvs --segments`).
    pub fn build(vgs: Vec<VgRow>, pvsegs: Vec<PvSegRow>, lvsegs: Vec<LvSegRow>) -> Index {
        let mut index = Index::default();
        for vg in vgs {
            let extent = vg.vg_extent_size.max(1);
            let metadata = metadata::Area::of(&vg);
            index.vgs.insert(
                vg.vg_name,
                Vg {
                    extent_size: extent,
                    size: vg.vg_size,
                    free_extents: vg.vg_free / extent,
                    pv_count: vg.pv_count,
                    pvs: Vec::new(),
                    metadata,
                },
            );
        }
        for seg in pvsegs {
            let Some(vg) = index.vgs.get_mut(&seg.vg_name) else {
                continue;
            };
            if seg.pv_name.starts_with('[') {
                // `[unknown]`: a PV of the metadata lvm2 did not find; nothing to place there.
                continue;
            }
            let pv = match vg.pvs.iter_mut().position(|p| p.name == seg.pv_name) {
                Some(i) => &mut vg.pvs[i],
                None => {
                    vg.pvs.push(Pv {
                        name: seg.pv_name.clone(),
                        pe_start: seg.pe_start,
                        free: Vec::new(),
                    });
                    vg.pvs.last_mut().expect("just pushed")
                }
            };
            if seg.lv_name.is_empty() && seg.pvseg_size > 0 {
                release(
                    &mut pv.free,
                    Extents {
                        first: seg.pvseg_start,
                        count: seg.pvseg_size,
                    },
                );
            }
        }
        let mut grouped: BTreeMap<(String, String), (LvRow, Vec<SegRow>)> = BTreeMap::new();
        for row in lvsegs {
            let (lv, seg) = row.split();
            grouped
                .entry((lv.vg_name.clone(), lv.lv_name.clone()))
                .or_insert_with(|| (lv, Vec::new()))
                .1
                .push(seg);
        }
        for (key, (row, segments)) in grouped {
            index.lvs.insert(key, Lv::new(row, &segments));
        }
        index
    }

    pub fn vg(&self, name: &str) -> Option<&Vg> {
        self.vgs.get(name)
    }

    /// Whether a VG has PVs lvm2 did not find (a `vgextend` with a PV the
    /// `--devices` list lacks, or a PV that is gone).
    pub fn lacks_pvs(&self) -> bool {
        self.vgs
            .values()
            .any(|vg| (vg.pvs.len() as u64) < vg.pv_count)
    }

    /// Every PV of the indexed VGs, as lvm2 names them.
    pub fn pv_names(&self) -> Vec<String> {
        self.vgs
            .values()
            .flat_map(|vg| vg.pvs.iter().map(|p| p.name.clone()))
            .collect()
    }

    pub fn lvs(&self) -> impl Iterator<Item = &Lv> {
        self.lvs.values()
    }

    /// An LV by name, in whichever indexed VG holds it (Kennel's names are
    /// unique IDs).
    pub fn find(&self, name: &str) -> Option<&Lv> {
        self.lvs.values().find(|lv| lv.row.lv_name == name)
    }

    pub fn get(&self, vg: &str, name: &str) -> Option<&Lv> {
        self.lvs.get(&(vg.to_owned(), name.to_owned()))
    }

    pub fn get_mut(&mut self, vg: &str, name: &str) -> Option<&mut Lv> {
        self.lvs.get_mut(&(vg.to_owned(), name.to_owned()))
    }

    /// Add or replace an LV. Its extents must already be taken (see
    /// [`Index::take_contiguous`]) or accounted with [`Index::take_extents`].
    /// A new LV's text is taken from the VG's metadata area estimate, and so
    /// is what a replaced LV's text grew by.
    pub fn insert(&mut self, lv: Lv) {
        let key = (lv.row.vg_name.clone(), lv.row.lv_name.clone());
        let before = self
            .lvs
            .get(&key)
            .map_or(0, |old| metadata::lv_bytes(&old.row.lv_tags));
        if let Some(v) = self.vgs.get_mut(&lv.row.vg_name) {
            v.metadata
                .take(metadata::lv_bytes(&lv.row.lv_tags).saturating_sub(before));
        }
        if let Ok(place) = &lv.place {
            // Its reservation, if it had one, is an LV now.
            self.reserved
                .retain(|(vg, range)| !(vg == &lv.row.vg_name && range == place));
        }
        self.lvs.insert(key, lv);
    }

    /// Replace a VG's metadata area figure with one lvm2 just reported.
    pub fn set_metadata(&mut self, vg: &str, area: metadata::Area) {
        if let Some(v) = self.vgs.get_mut(vg) {
            v.metadata = area;
        }
    }

    /// Forget an LV that lvm2 removed, giving its extents back.
    pub fn remove(&mut self, vg: &str, name: &str) -> Option<Lv> {
        let lv = self.lvs.remove(&(vg.to_owned(), name.to_owned()))?;
        if let Some(v) = self.vgs.get_mut(vg) {
            if !lv.missing {
                v.metadata
                    .give_back(metadata::lv_bytes_at_least(&lv.row.lv_tags));
            }
        }
        if lv.missing || lv.row.is_thin() {
            return Some(lv);
        }
        if let Some(v) = self.vgs.get_mut(vg) {
            let extents = lv.row.lv_size / v.extent_size;
            v.free_extents += extents;
            if let Ok(place) = &lv.place {
                let name = place.pv.to_string_lossy();
                if let Some(pv) = v.pvs.iter_mut().find(|p| p.name == name) {
                    release(
                        &mut pv.free,
                        Extents {
                            first: place.first,
                            count: place.count,
                        },
                    );
                }
            }
        }
        Some(lv)
    }

    /// Reserve the first free run of `count` extents on one PV of `vg`.
    pub fn take_contiguous(&mut self, vg: &str, count: u64) -> Option<PeRange> {
        let v = self.vgs.get_mut(vg)?;
        for pv in &mut v.pvs {
            if let Some(i) = pv.free.iter().position(|r| r.count >= count) {
                let run = pv.free[i];
                if run.count == count {
                    pv.free.remove(i);
                } else {
                    pv.free[i] = Extents {
                        first: run.first + count,
                        count: run.count - count,
                    };
                }
                v.free_extents = v.free_extents.saturating_sub(count);
                let range = PeRange {
                    pv: PathBuf::from(&pv.name),
                    first: run.first,
                    count,
                };
                self.reserved.push((vg.to_owned(), range.clone()));
                return Some(range);
            }
        }
        None
    }

    /// Give back a reservation that was never used.
    pub fn give_back(&mut self, vg: &str, range: &PeRange) {
        self.reserved.retain(|(v, r)| !(v == vg && r == range));
        if let Some(v) = self.vgs.get_mut(vg) {
            let name = range.pv.to_string_lossy();
            if let Some(pv) = v.pvs.iter_mut().find(|p| p.name == name) {
                release(
                    &mut pv.free,
                    Extents {
                        first: range.first,
                        count: range.count,
                    },
                );
                v.free_extents += range.count;
            }
        }
    }

    /// Account extents lvm2 allocated where it chose (device-mapper mode):
    /// the per-PV map is stale until the next refresh, which is harmless
    /// because that mode lets lvm2 place every LV.
    pub fn take_extents(&mut self, vg: &str, count: u64) {
        if let Some(v) = self.vgs.get_mut(vg) {
            v.free_extents = v.free_extents.saturating_sub(count);
        }
    }

    /// Bytes where the LV lives on its PV: (PV, offset, length).
    pub fn window(&self, lv: &Lv) -> Result<(String, u64, u64), String> {
        let place = lv.place.as_ref().map_err(Clone::clone)?;
        let vg = self
            .vgs
            .get(&lv.row.vg_name)
            .ok_or_else(|| format!("volume group {} is not indexed", lv.row.vg_name))?;
        let name = place.pv.to_string_lossy();
        let pv = vg
            .pvs
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("PV {name} is not indexed"))?;
        Ok((
            pv.name.clone(),
            pv.pe_start + place.first * vg.extent_size,
            place.count * vg.extent_size,
        ))
    }

    /// Take a freshly loaded index, keeping what it cannot know: Kennel LVs
    /// that vanished from the reports stay, marked missing, so they show as
    /// abnormal volumes instead of disappearing silently.
    pub fn merge_fresh(&mut self, mut fresh: Index) {
        for (key, lv) in &self.lvs {
            if lv.is_owned() && !fresh.lvs.contains_key(key) {
                if !lv.missing {
                    tracing::warn!(lv = %key.1, vg = %key.0, "a Kennel LV was removed outside the driver");
                }
                let mut gone = lv.clone();
                gone.missing = true;
                fresh.lvs.insert(key.clone(), gone);
            }
        }
        let reserved = std::mem::take(&mut self.reserved);
        *self = fresh;
        for (vg, range) in &reserved {
            self.hold(vg, range);
        }
        self.reserved = reserved;
    }

    /// Take a reservation's extents out of a fresh free map (those still
    /// free there: its `lvcreate` may have run before the reload read them).
    fn hold(&mut self, vg: &str, range: &PeRange) {
        let Some(v) = self.vgs.get_mut(vg) else {
            return;
        };
        let name = range.pv.to_string_lossy();
        if let Some(pv) = v.pvs.iter_mut().find(|p| p.name == name) {
            let held = carve(
                &mut pv.free,
                Extents {
                    first: range.first,
                    count: range.count,
                },
            );
            v.free_extents = v.free_extents.saturating_sub(held);
        }
    }

    /// Merge a reload that other changes may have raced: `before` is the
    /// index as it was when the reload started reading lvm2. An LV added or
    /// changed in the index meanwhile is newer than the reload and kept; one
    /// removed meanwhile stays removed (the reload may have read it first).
    pub fn merge_reload(&mut self, before: &Index, mut fresh: Index) {
        for key in before.lvs.keys() {
            if !self.lvs.contains_key(key) {
                fresh.lvs.remove(key);
            }
        }
        let newer: Vec<((String, String), Lv)> = self
            .lvs
            .iter()
            .filter(|(key, lv)| before.lvs.get(*key) != Some(*lv))
            .map(|(key, lv)| (key.clone(), lv.clone()))
            .collect();
        self.merge_fresh(fresh);
        for (key, lv) in newer {
            // Created while lvm2 was read: maybe not in the fresh metadata figure.
            if !before.lvs.contains_key(&key) {
                if let Some(v) = self.vgs.get_mut(&key.0) {
                    v.metadata.take(metadata::lv_bytes(&lv.row.lv_tags));
                }
            }
            self.lvs.insert(key, lv);
        }
    }
}

/// What an index knows that a restart must rebuild identically: free
/// extents, and each LV's size, meaning and place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// VG name, free extents, and each PV's free runs.
    pub vgs: Vec<(String, u64, Vec<PvFree>)>,
    /// VG, LV, size, what it is, where it lies.
    pub lvs: Vec<(String, String, u64, String, Option<PeRange>)>,
}

/// A PV's name and free runs.
pub type PvFree = (String, Vec<Extents>);

impl Index {
    /// The comparable part; with `placement` false (device-mapper mode,
    /// where lvm2 places LVs) the extent maps are left out.
    pub fn view(&self, placement: bool) -> View {
        View {
            vgs: self
                .vgs
                .iter()
                .map(|(name, vg)| {
                    let pvs = if placement {
                        vg.pvs
                            .iter()
                            .map(|p| (p.name.clone(), p.free.clone()))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    (name.clone(), vg.free_extents, pvs)
                })
                .collect(),
            lvs: self
                .lvs
                .values()
                .map(|lv| {
                    (
                        lv.row.vg_name.clone(),
                        lv.row.lv_name.clone(),
                        lv.row.lv_size,
                        format!("{:?}", lv.kind),
                        lv.place.clone().ok().filter(|_| placement),
                    )
                })
                .collect(),
        }
    }
}

/// Take a run out of a sorted free list; how many of its extents were free.
fn carve(free: &mut Vec<Extents>, run: Extents) -> u64 {
    let (start, end) = (run.first, run.first + run.count);
    let mut kept = Vec::with_capacity(free.len() + 1);
    let mut carved = 0;
    for r in free.drain(..) {
        let (a, b) = (r.first, r.first + r.count);
        if b <= start || a >= end {
            kept.push(r);
            continue;
        }
        if a < start {
            kept.push(Extents {
                first: a,
                count: start - a,
            });
        }
        if b > end {
            kept.push(Extents {
                first: end,
                count: b - end,
            });
        }
        carved += b.min(end) - a.max(start);
    }
    *free = kept;
    carved
}

/// Put a run back into a sorted free list, merging neighbours.
fn release(free: &mut Vec<Extents>, run: Extents) {
    let at = free.partition_point(|r| r.first < run.first);
    free.insert(at, run);
    let mut merged: Vec<Extents> = Vec::with_capacity(free.len());
    for r in free.drain(..) {
        match merged.last_mut() {
            Some(last) if last.first + last.count >= r.first => {
                let end = (last.first + last.count).max(r.first + r.count);
                last.count = end - last.first;
            }
            _ => merged.push(r),
        }
    }
    *free = merged;
}

#[cfg(test)]
mod tests;
