//! Capacity: the free space of a VG, a thin pool named by a layout, and the
//! room a thin pool has left under the overprovisioning ratio. A thin pool
//! that does not zero newly provisioned blocks (`-Zn`) is refused: Kennel
//! does not zero thin volumes itself, it relies on the pool.

use std::collections::BTreeMap;

use super::cli::LvRow;
use super::params::{self, Layout, LvmParams};
use super::LvmBackend;
use crate::backend::PoolCapacity;
use crate::error::{Error, Result};

impl LvmBackend {
    /// What a StorageClass's device class (and thin pool) can still take.
    pub(super) fn capacity_of(&self, raw: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        let params = LvmParams::parse(raw)?;
        let vg = self.class(&params)?.vg.clone();
        match &params.layout {
            Layout::Linear => {
                let index = self.index();
                let v = index
                    .vg(&vg)
                    .ok_or_else(|| Error::Precondition(format!("volume group {vg:?} not found")))?;
                let free = v.free_extents * v.extent_size;
                Ok(PoolCapacity {
                    total_bytes: v.size,
                    available_bytes: round_down(free, self.granularity),
                    provisioned_bytes: v.size.saturating_sub(free),
                })
            }
            Layout::Thin { pool } => {
                let mut pool = self.pool(&vg, pool)?;
                // The pool fills as volumes are written, which no index sees:
                // ask for its fill now (one `lvs` of the pool alone).
                let path = format!("{}/{}", pool.vg_name, pool.lv_name);
                let Some(now) = self
                    .lvm
                    .lvs(std::slice::from_ref(&path))?
                    .into_iter()
                    .next()
                else {
                    return Err(Error::Precondition(format!(
                        "thin pool {path} is gone (removed outside Kennel)"
                    )));
                };
                pool.data_percent = now.data_percent;
                pool.lv_health_status = now.lv_health_status;
                Ok(self.thin_room(&pool))
            }
        }
    }

    /// The thin pool a thin layout names, checked to exist.
    pub(super) fn pool(&self, vg: &str, pool: &str) -> Result<LvRow> {
        let indexed = self
            .index()
            .get(vg, pool)
            .filter(|lv| !lv.missing)
            .map(|lv| lv.row.clone());
        let row = match indexed {
            Some(row) => Some(row),
            // A pool made since the last refresh (an admin adding a thin
            // class): confirmed with one targeted `lvs`, then indexed.
            None => self
                .fetch(&[vg.to_owned()], pool)?
                .into_iter()
                .next()
                .map(|lv| {
                    if lv.row.is_thin_pool() {
                        tracing::info!(
                            vg,
                            pool,
                            "a thin pool unknown to the index was found; indexed"
                        );
                        let mut index = self.index();
                        if index.get(vg, pool).is_none() {
                            index.insert(lv.clone());
                        }
                    }
                    lv.row
                }),
        };
        let row = row.filter(LvRow::is_thin_pool).ok_or_else(|| {
            Error::invalid(format!(
                "parameter {:?}: no thin pool {pool:?} in volume group {vg:?}",
                params::THIN_POOL
            ))
        })?;
        if zeroes_new_blocks(&row) {
            return Ok(row);
        }
        // Perhaps changed since it was indexed (`lvchange -Zy`): ask before refusing.
        if let Some(fresh) = self
            .fetch(&[vg.to_owned()], pool)?
            .into_iter()
            .find(|lv| lv.row.is_thin_pool() && zeroes_new_blocks(&lv.row))
        {
            self.index().insert(fresh.clone());
            return Ok(fresh.row);
        }
        Err(Error::Precondition(format!(
            "thin pool {vg}/{pool} does not zero new blocks (made with -Zn): a new thin volume could read a deleted one's data; Kennel uses only pools that zero them (lvchange -Zy {vg}/{pool})"
        )))
    }

    /// Room for more thin volumes in `pool`.
    pub(super) fn thin_room(&self, pool: &LvRow) -> PoolCapacity {
        let provisioned: u64 = self
            .index()
            .lvs()
            .filter(|lv| {
                !lv.missing
                    && lv.row.vg_name == pool.vg_name
                    && lv.row.pool_lv == pool.lv_name
                    && lv.row.is_thin()
            })
            .map(|lv| lv.row.lv_size)
            .sum();
        thin_pool_room(pool, provisioned, self.ratio, self.granularity)
    }

    pub(super) fn check_thin_room(&self, pool: &LvRow, extra: u64) -> Result<()> {
        let room = self.thin_room(pool);
        let limit = (pool.lv_size as f64 * self.ratio) as u64;
        if room.provisioned_bytes.saturating_add(extra) > limit {
            return Err(Error::Exhausted(format!(
                "thin pool {}/{} would promise {} bytes, more than {} x its {} bytes (--thin-overprovision-ratio)",
                pool.vg_name,
                pool.lv_name,
                room.provisioned_bytes + extra,
                self.ratio,
                pool.lv_size
            )));
        }
        Ok(())
    }
}

/// What a thin pool can still take: the smaller of its free data space and
/// what the overprovisioning ratio leaves to promise. A pool lvm2 reports
/// unhealthy (out of data, metadata full and read-only, failed) takes
/// nothing, whatever its data fill says.
fn thin_pool_room(pool: &LvRow, provisioned: u64, ratio: f64, granularity: u64) -> PoolCapacity {
    let used = pool.data_percent.unwrap_or(0.0).clamp(0.0, 100.0);
    let physical_free = if pool.lv_health_status.is_empty() {
        (pool.lv_size as f64 * (100.0 - used) / 100.0) as u64
    } else {
        0
    };
    let promise_limit = (pool.lv_size as f64 * ratio) as u64;
    PoolCapacity {
        total_bytes: pool.lv_size,
        available_bytes: round_down(
            physical_free.min(promise_limit.saturating_sub(provisioned)),
            granularity,
        ),
        provisioned_bytes: provisioned,
    }
}

/// Whether a thin pool overwrites newly provisioned blocks with zeros
/// (`-Zy`; the eighth `lv_attr` character is `z`), so a block a deleted
/// thin volume wrote never reaches the next one.
fn zeroes_new_blocks(pool: &LvRow) -> bool {
    pool.lv_attr.chars().nth(7) == Some('z')
}

fn round_down(bytes: u64, granularity: u64) -> u64 {
    bytes / granularity * granularity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(data_percent: Option<f64>, health: &str) -> LvRow {
        LvRow {
            lv_name: "pool".into(),
            vg_name: "vg".into(),
            lv_size: 1 << 30,
            lv_tags: vec![],
            lv_attr: "twi-aotz--".into(),
            segtype: "thin-pool".into(),
            pool_lv: String::new(),
            origin: String::new(),
            lv_active: "active".into(),
            lv_path: String::new(),
            data_percent,
            lv_health_status: health.into(),
        }
    }

    #[test]
    fn thin_room_is_the_smaller_of_free_data_and_what_is_left_to_promise() {
        const MIB: u64 = 1 << 20;
        // A quarter written, nothing promised: the free data space.
        let room = thin_pool_room(&pool(Some(25.0), ""), 0, 2.0, MIB);
        assert_eq!(room.available_bytes, 768 * MIB);
        // Promises near the ratio's limit: what is left to promise.
        let room = thin_pool_room(&pool(Some(25.0), ""), 1900 * MIB, 2.0, MIB);
        assert_eq!(room.available_bytes, 148 * MIB);
        assert_eq!(room.provisioned_bytes, 1900 * MIB);
        // Promised past the limit (a ratio lowered since): nothing, not an underflow.
        let room = thin_pool_room(&pool(Some(0.0), ""), 3 << 30, 2.0, MIB);
        assert_eq!(room.available_bytes, 0);
    }

    #[test]
    fn a_pool_that_does_not_zero_new_blocks_is_told_apart() {
        assert!(zeroes_new_blocks(&pool(None, "")));
        let mut no_zeroing = pool(None, "");
        no_zeroing.lv_attr = "twi-aot---".into();
        assert!(!zeroes_new_blocks(&no_zeroing));
        no_zeroing.lv_attr = String::new();
        assert!(!zeroes_new_blocks(&no_zeroing));
    }

    #[test]
    fn an_unhealthy_thin_pool_has_no_room() {
        for health in ["out_of_data", "metadata_read_only", "failed"] {
            let room = thin_pool_room(&pool(Some(10.0), health), 0, 1.0, 1 << 20);
            assert_eq!(room.available_bytes, 0, "{health}");
            assert_eq!(room.total_bytes, 1 << 30);
        }
    }
}
