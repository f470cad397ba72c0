use super::*;

fn pvseg(start: u64, size: u64, lv: &str) -> PvSegRow {
    PvSegRow {
        pv_name: "/dev/loop7".into(),
        vg_name: "vg".into(),
        pe_start: 1 << 20,
        pvseg_start: start,
        pvseg_size: size,
        lv_name: lv.into(),
    }
}

fn vg_row(free_extents: u64) -> VgRow {
    VgRow {
        vg_name: "vg".into(),
        vg_size: 100 << 22,
        vg_free: free_extents << 22,
        vg_extent_size: 4 << 20,
        pv_count: 1,
        vg_mda_size: 1044480,
        vg_mda_free: 500_000,
    }
}

fn lvseg(name: &str, tags: Vec<String>, first: u64, count: u64) -> LvSegRow {
    LvSegRow {
        lv_name: name.into(),
        vg_name: "vg".into(),
        lv_size: count << 22,
        lv_tags: tags,
        lv_attr: "-wi-------".into(),
        segtype: "linear".into(),
        pool_lv: String::new(),
        origin: String::new(),
        lv_active: String::new(),
        lv_path: String::new(),
        data_percent: None,
        lv_health_status: String::new(),
        stripes: 1,
        seg_start_pe: 0,
        seg_size_pe: count,
        seg_pe_ranges: format!("/dev/loop7:{first}-{}", first + count - 1),
    }
}

#[test]
fn free_runs_are_taken_first_fit_and_merged_back() {
    let mut index = Index::build(
        vec![vg_row(90)],
        vec![pvseg(0, 10, ""), pvseg(10, 10, "other"), pvseg(20, 80, "")],
        vec![lvseg("other", vec![], 10, 10)],
    );
    let before = index.view(true);
    let small = index.take_contiguous("vg", 4).expect("room");
    assert_eq!((small.first, small.count), (0, 4));
    let big = index.take_contiguous("vg", 20).expect("room");
    assert_eq!(big.first, 20, "the first run is too short now");
    assert!(index.take_contiguous("vg", 61).is_none());
    assert_eq!(index.vg("vg").map(|v| v.free_extents), Some(66));
    index.give_back("vg", &big);
    index.give_back("vg", &small);
    assert_eq!(index.view(true), before);
}

#[test]
fn a_reload_keeps_the_extents_reserved_meanwhile() {
    let reports = || (vec![vg_row(100)], vec![pvseg(0, 100, "")]);
    let (vgs, pvsegs) = reports();
    let mut index = Index::build(vgs, pvsegs, vec![]);
    // A reload reads lvm2 while an `lvcreate` holds a reservation.
    let before = index.clone();
    let reserved = index.take_contiguous("vg", 10).expect("room");
    let (vgs, pvsegs) = reports();
    index.merge_reload(&before, Index::build(vgs, pvsegs, vec![]));
    assert_eq!(index.vg("vg").map(|v| v.free_extents), Some(90));
    let next = index.take_contiguous("vg", 10).expect("room");
    assert!(
        next.first >= reserved.first + reserved.count,
        "{reserved:?} offered again as {next:?}"
    );
    // The background refresh keeps them too.
    let (vgs, pvsegs) = reports();
    index.merge_fresh(Index::build(vgs, pvsegs, vec![]));
    assert_eq!(index.vg("vg").map(|v| v.free_extents), Some(80));
    // Given back, a reservation ends: the next reload frees its extents.
    index.give_back("vg", &next);
    let (vgs, pvsegs) = reports();
    index.merge_fresh(Index::build(vgs, pvsegs, vec![]));
    assert_eq!(index.vg("vg").map(|v| v.free_extents), Some(90));
    // Created and indexed, it ends too; lvm2's report then holds the LV.
    let mut lv = Lv::new(lvseg("made", vec![], 0, 10).split().0, &[]);
    lv.place = Ok(reserved);
    index.insert(lv);
    let pvsegs = vec![pvseg(0, 10, "made"), pvseg(10, 90, "")];
    index.merge_fresh(Index::build(
        vec![vg_row(90)],
        pvsegs,
        vec![lvseg("made", vec![], 0, 10)],
    ));
    assert_eq!(index.vg("vg").map(|v| v.free_extents), Some(90));
    assert!(index.reserved.is_empty());
}

#[test]
fn a_pv_lvm2_did_not_find_is_noticed_and_never_offered() {
    let mut vg = vg_row(100);
    vg.pv_count = 2;
    let mut unknown = pvseg(0, 50, "");
    unknown.pv_name = "[unknown]".into();
    let mut index = Index::build(vec![vg], vec![pvseg(0, 50, ""), unknown], vec![]);
    assert!(index.lacks_pvs());
    assert_eq!(index.pv_names(), vec!["/dev/loop7".to_owned()]);
    assert!(index.take_contiguous("vg", 51).is_none());
    let complete = Index::build(vec![vg_row(50)], vec![pvseg(0, 50, "")], vec![]);
    assert!(!complete.lacks_pvs());
}

#[test]
fn hostile_tags_are_reported_and_skipped_not_fatal() {
    let id = VolumeId::generate();
    let huge = vec![
        tags::OWNER.to_owned(),
        "kennel.csi.dev/n=18446744073709551615".to_owned(),
        "kennel.csi.dev/r0=7b".to_owned(),
    ];
    let not_hex = vec![
        tags::OWNER.to_owned(),
        "kennel.csi.dev/n=1".to_owned(),
        "kennel.csi.dev/r0=zz\u{e9}".to_owned(),
    ];
    let index = Index::build(
        vec![vg_row(80)],
        vec![pvseg(0, 20, "x"), pvseg(20, 80, "")],
        vec![
            lvseg(id.as_str(), huge, 0, 10),
            lvseg(VolumeId::generate().as_str(), not_hex, 10, 5),
            lvseg("owned-but-not-an-id", vec![tags::OWNER.to_owned()], 15, 5),
        ],
    );
    let kinds: Vec<&Kind> = index.lvs().map(|lv| &lv.kind).collect();
    assert_eq!(kinds.len(), 3);
    assert!(
        kinds.iter().all(|k| matches!(k, Kind::Corrupt(_))),
        "{kinds:?}"
    );
    assert!(index.lvs().all(|lv| lv.volume().is_none()));
}

#[test]
fn a_replaced_lv_whose_tags_grew_takes_the_difference_from_the_metadata_area() {
    let mut index = Index::build(vec![vg_row(80)], vec![pvseg(0, 80, "")], vec![]);
    let free = |index: &Index| index.vg("vg").map(|v| v.metadata.free);
    let start = free(&index).expect("the VG");
    let (_, row) = owned_lv(0);
    let lv = Lv::new(row.split().0, &[]);
    let added = metadata::lv_bytes(&lv.row.lv_tags);
    index.insert(lv.clone());
    assert_eq!(free(&index), Some(start - added));
    // The same LV again (reactivated, say): nothing more.
    index.insert(lv.clone());
    assert_eq!(free(&index), Some(start - added));
    // Limits added: their tag's bytes; lifted: nothing back until lvm2's next figure.
    let mut limited = lv.clone();
    limited.row.lv_tags.push("kio=rb1m".to_owned());
    index.insert(limited);
    assert_eq!(
        free(&index),
        Some(start - added - "kio=rb1m".len() as u64 - 4)
    );
    index.insert(lv);
    assert_eq!(
        free(&index),
        Some(start - added - "kio=rb1m".len() as u64 - 4)
    );
}

#[test]
fn a_volumes_io_limits_are_read_from_their_tag() {
    let (id, mut row) = owned_lv(0);
    row.lv_tags.push("kio=rb1m+ri500".to_owned());
    let (damaged_id, mut damaged) = owned_lv(10);
    damaged.lv_tags.push("kio=rb1m+rb2m".to_owned());
    let index = Index::build(
        vec![vg_row(80)],
        vec![pvseg(0, 20, "x"), pvseg(20, 80, "")],
        vec![row, damaged],
    );
    let limits = |id: &VolumeId| {
        index
            .find(id.as_str())
            .and_then(Lv::volume)
            .map(|v| v.params.io_limits)
    };
    let expected = crate::model::io_limits::IoLimits {
        read_bps: Some(1 << 20),
        read_iops: Some(500),
        ..Default::default()
    };
    assert_eq!(limits(&id), Some(expected));
    // A tag that cannot be read costs the limits, never the volume.
    assert_eq!(limits(&damaged_id), Some(Default::default()));
}

#[test]
fn a_refresh_keeps_vanished_kennel_lvs_as_missing() {
    let (id, row) = owned_lv(0);
    let mut index = Index::build(
        vec![vg_row(90)],
        vec![pvseg(0, 10, id.as_str()), pvseg(10, 90, "")],
        vec![row],
    );
    assert!(index.find(id.as_str()).and_then(Lv::volume).is_some());
    index.merge_fresh(Index::build(
        vec![vg_row(100)],
        vec![pvseg(0, 100, "")],
        vec![],
    ));
    let lv = index.find(id.as_str()).expect("kept");
    assert!(lv.missing);
    // Forgetting a missing LV gives back nothing: lvm2 already has it.
    index.remove("vg", id.as_str());
    assert_eq!(index.vg("vg").map(|v| v.free_extents), Some(100));
}

fn owned_lv(first: u64) -> (VolumeId, LvSegRow) {
    let id = VolumeId::generate();
    let record = crate::backend::VolumeRecord {
        id: id.clone(),
        name: format!("pvc-{first}"),
        capacity_bytes: 40 << 20,
        requested: Default::default(),
        capabilities: vec![],
        params: Default::default(),
        node_id: "n".into(),
        machine_id: "m".into(),
        created_unix: 1,
        source: None,
    };
    let tag_list = tags::encode(&record).expect("test setup");
    let row = lvseg(id.as_str(), tag_list, first, 10);
    (id, row)
}

#[test]
fn a_reload_never_undoes_changes_that_raced_it() {
    let (kept, kept_row) = owned_lv(0);
    let (removed, removed_row) = owned_lv(10);
    let (added, added_row) = owned_lv(20);
    let mut index = Index::build(
        vec![vg_row(80)],
        vec![pvseg(0, 10, "a"), pvseg(10, 10, "b"), pvseg(20, 80, "")],
        vec![kept_row.clone(), removed_row.clone()],
    );
    let before = index.clone();
    // While lvm2 was read: one volume was created, another removed.
    let mut created = Index::build(vec![vg_row(70)], vec![pvseg(20, 10, "c")], vec![added_row]);
    let added_lv = created.remove("vg", added.as_str()).expect("test setup");
    index.insert(added_lv);
    index.remove("vg", removed.as_str());
    // The reload read lvm2 before both.
    let fresh = Index::build(
        vec![vg_row(80)],
        vec![pvseg(0, 10, "a"), pvseg(10, 10, "b"), pvseg(20, 80, "")],
        vec![kept_row, removed_row],
    );
    index.merge_reload(&before, fresh);
    let added = index.find(added.as_str()).expect("the new volume stays");
    assert!(
        !added.missing,
        "a volume created during the reload is not missing"
    );
    assert!(
        index.find(removed.as_str()).is_none(),
        "a removed volume stays removed"
    );
    assert!(index.find(kept.as_str()).is_some_and(|lv| !lv.missing));
    // Without changes meanwhile, a reload is a plain refresh.
    let before = index.clone();
    let fresh = index.clone();
    index.merge_reload(&before, fresh);
    assert_eq!(index, before);
}
