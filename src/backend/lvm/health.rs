//! Why a volume's LV is unhealthy, read from the index alone (no lvm2 call):
//! `lv_attr`, `lv_active` and `lv_health_status` as the last refresh saw
//! them, for the LV and, for a thin volume, its pool, and the error of the
//! LV's last failed activation (see `activation`). This is the one place
//! that decides an LV volume's condition; each answer says what a person can
//! do about it.

use super::index::Lv;

/// `lv_attr` character 2: permissions.
const PERMISSIONS: usize = 1;
/// `lv_attr` character 5: state (`a` active).
const STATE: usize = 4;
/// `lv_attr` character 9: health.
const HEALTH: usize = 8;

fn attr(lv: &Lv, at: usize) -> char {
    lv.row.lv_attr.chars().nth(at).unwrap_or('-')
}

fn full_name(lv: &Lv) -> String {
    format!("{}/{}", lv.row.vg_name, lv.row.lv_name)
}

/// The problem with a volume's LV, if any. `pool` is the thin pool of a
/// thin volume (when indexed); `device_mapper` says whether LVs are meant
/// to be active (device-mapper mode keeps every volume active);
/// `activation` is why the driver's last activation of the LV failed.
pub fn problem(
    lv: &Lv,
    pool: Option<&Lv>,
    device_mapper: bool,
    activation: Option<&str>,
) -> Option<String> {
    let name = full_name(lv);
    if lv.missing {
        return Some(format!(
            "logical volume {name} is missing (removed outside Kennel); its data is gone \
             unless the LV is restored (vgcfgrestore)"
        ));
    }
    if attr(lv, HEALTH) == 'p' || lv.row.lv_health_status == "partial" {
        return Some(format!(
            "logical volume {name} is partial: a physical volume it uses is missing or \
             failed; `pvs` shows which; reconnect or replace it (vgreduce --removemissing \
             loses the data on it)"
        ));
    }
    match attr(lv, HEALTH) {
        'X' => {
            return Some(format!(
                "logical volume {name}'s state is unknown to lvm2; check `lvs -a {name}` \
                 and the kernel log"
            ))
        }
        'F' => {
            return Some(format!(
                "thin volume {name} failed; check its pool and the kernel log"
            ))
        }
        _ => {}
    }
    if let Some(pool) = pool.filter(|_| lv.row.is_thin()) {
        if let Some(why) = pool_problem(pool) {
            return Some(why);
        }
    }
    // `lv_active` is what the driver keeps current (it activates LVs itself);
    // `lv_attr` is as the last refresh read it, or empty for an LV made since.
    let inactive = lv.row.lv_active != "active";
    if let Some(why) = activation.filter(|_| inactive) {
        // Its calls retry the activation: fixing the cause is enough.
        return Some(format!(
            "logical volume {name} cannot be activated: {why}; the volume cannot be used \
             until it can (its next stage or delete tries again)"
        ));
    }
    let state = match attr(lv, STATE) {
        _ if inactive => Some("inactive"),
        's' => Some("suspended"),
        'S' | 'I' => Some("invalid"),
        'd' => Some("present without tables"),
        'i' => Some("present with inactive tables"),
        _ => None,
    };
    if let Some(state) = state.filter(|_| device_mapper) {
        return Some(format!(
            "logical volume {name} is {state}; the volume cannot be used until it is active \
             again: lvchange -ay {name}"
        ));
    }
    if matches!(attr(lv, PERMISSIONS), 'r' | 'R') {
        return Some(format!(
            "logical volume {name} is read-only in lvm2; make it writable: lvchange -p rw {name}"
        ));
    }
    if !lv.row.lv_health_status.is_empty() {
        return Some(format!(
            "logical volume {name} reports {}; see `lvs -o+lv_health_status {name}`",
            lv.row.lv_health_status
        ));
    }
    None
}

/// The problem with a thin pool, for the volumes in it.
fn pool_problem(pool: &Lv) -> Option<String> {
    let name = full_name(pool);
    let status = pool.row.lv_health_status.as_str();
    if attr(pool, HEALTH) == 'D' || status == "out_of_data" {
        return Some(format!(
            "thin pool {name} is out of data space: writes to its volumes fail; grow it \
             (lvextend -L +SIZE {name}) or delete volumes or snapshots in it"
        ));
    }
    if attr(pool, HEALTH) == 'M' || status == "metadata_read_only" {
        return Some(format!(
            "thin pool {name} has read-only metadata (out of metadata space or damaged): \
             its volumes cannot change; grow its metadata (lvextend --poolmetadatasize \
             +SIZE {name}) or repair it (lvconvert --repair {name})"
        ));
    }
    if attr(pool, HEALTH) == 'F' || status == "failed" {
        return Some(format!(
            "thin pool {name} failed; its volumes are unusable until it is repaired \
             (lvconvert --repair {name})"
        ));
    }
    if attr(pool, HEALTH) == 'p' {
        return Some(format!(
            "thin pool {name} is partial: a physical volume it uses is missing or failed; \
             `pvs` shows which"
        ));
    }
    if matches!(attr(pool, PERMISSIONS), 'r' | 'R') {
        return Some(format!(
            "thin pool {name} is read-only: its volumes cannot be written; lvchange -p rw {name}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::lvm::cli::LvRow;
    use crate::backend::lvm::index::Kind;

    fn lv(name: &str, attr: &str, segtype: &str, active: &str, health: &str) -> Lv {
        Lv {
            row: LvRow {
                lv_name: name.into(),
                vg_name: "vg0".into(),
                lv_size: 64 << 20,
                lv_tags: vec![],
                lv_attr: attr.into(),
                segtype: segtype.into(),
                pool_lv: if segtype == "thin" {
                    "pool".into()
                } else {
                    String::new()
                },
                origin: String::new(),
                lv_active: active.into(),
                lv_path: String::new(),
                data_percent: None,
                lv_health_status: health.into(),
            },
            kind: Kind::Pending,
            place: Err("n/a".into()),
            missing: false,
        }
    }

    fn linear(attr: &str, active: &str, health: &str) -> Lv {
        lv("kv-a", attr, "linear", active, health)
    }

    fn pool(attr: &str, health: &str) -> Lv {
        lv("pool", attr, "thin-pool", "active", health)
    }

    #[test]
    fn a_healthy_lv_has_no_problem_in_either_mode() {
        assert_eq!(
            problem(&linear("-wi-a-----", "active", ""), None, true, None),
            None
        );
        // Without device-mapper lvm2 activates nothing: inactive is normal.
        assert_eq!(
            problem(&linear("-wi-------", "", ""), None, false, None),
            None
        );
        let thin = lv("kv-t", "Vwi-aotz--", "thin", "active", "");
        assert_eq!(
            problem(&thin, Some(&pool("twi-aotz--", "")), true, None),
            None
        );
        // Just created (no lv_attr read yet), or activated since the last refresh.
        assert_eq!(problem(&linear("", "active", ""), None, true, None), None);
        assert_eq!(
            problem(&linear("-wi-------", "active", ""), None, true, None),
            None
        );
    }

    #[test]
    fn a_missing_lv_says_it_was_removed() {
        let mut gone = linear("-wi-a-----", "active", "");
        gone.missing = true;
        let why = problem(&gone, None, true, None).unwrap();
        assert!(why.contains("vg0/kv-a is missing"), "{why}");
    }

    #[test]
    fn an_inactive_lv_is_a_problem_only_with_device_mapper() {
        let why = problem(&linear("-wi-------", "", ""), None, true, None).unwrap();
        assert!(why.contains("vg0/kv-a is inactive"), "{why}");
        assert!(why.contains("lvchange -ay vg0/kv-a"), "{why}");
        let why = problem(&linear("-wi-s-----", "active", ""), None, true, None).unwrap();
        assert!(why.contains("suspended"), "{why}");
    }

    #[test]
    fn a_failed_activation_says_why_while_the_lv_is_inactive() {
        let why = "Device vg0-kv--a already exists";
        let inactive = linear("-wi-------", "", "");
        let said = problem(&inactive, None, true, Some(why)).unwrap();
        assert!(said.contains("vg0/kv-a cannot be activated"), "{said}");
        assert!(said.contains(why), "{said}");
        assert!(
            !said.contains("is inactive"),
            "one message, not two: {said}"
        );
        // Activated since (by hand, or by a later call): healthy again.
        let active = linear("-wi-a-----", "active", "");
        assert_eq!(problem(&active, None, true, Some(why)), None);
        // A missing PV is the cause to report: lvm2 refuses to activate a partial LV.
        let partial = linear("-wi-----p-", "", "partial");
        let said = problem(&partial, None, true, Some(why)).unwrap();
        assert!(said.contains("is partial"), "{said}");
    }

    #[test]
    fn a_partial_lv_names_the_missing_pv() {
        for (active, dm) in [("active", true), ("", false)] {
            let why = problem(&linear("-wi-a---p-", active, "partial"), None, dm, None).unwrap();
            assert!(why.contains("vg0/kv-a is partial"), "{why}");
            assert!(why.contains("physical volume"), "{why}");
        }
    }

    #[test]
    fn a_thin_volume_reports_its_pools_trouble() {
        let thin = lv("kv-t", "Vwi-aotz--", "thin", "active", "");
        for (attr, health, expect) in [
            ("twi-aotzD-", "out_of_data", "out of data space"),
            ("twi-aotzM-", "metadata_read_only", "read-only metadata"),
            ("twi-aotzF-", "failed", "failed"),
            ("tri-aotz--", "", "is read-only"),
        ] {
            let why = problem(&thin, Some(&pool(attr, health)), true, None).unwrap();
            assert!(why.contains("thin pool vg0/pool"), "{why}");
            assert!(why.contains(expect), "{attr}: {why}");
        }
        let failed = lv("kv-t", "Vwi-aotzF-", "thin", "active", "failed");
        let why = problem(&failed, Some(&pool("twi-aotz--", "")), true, None).unwrap();
        assert!(why.contains("thin volume vg0/kv-t failed"), "{why}");
    }

    #[test]
    fn a_read_only_lv_and_other_health_states_are_reported() {
        let why = problem(&linear("-ri-a-----", "active", ""), None, true, None).unwrap();
        assert!(why.contains("read-only"), "{why}");
        let why = problem(
            &linear("-wi-a-----", "active", "refresh needed"),
            None,
            true,
            None,
        )
        .unwrap();
        assert!(why.contains("refresh needed"), "{why}");
    }
}
