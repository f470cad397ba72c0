use super::*;

#[test]
fn reports_decode_into_typed_rows() {
    let json = r#"{"report": [{"lv": [
        {"lv_name":"kv-a", "vg_name":"vg0", "lv_size":"104857600", "lv_tags":"kennel.csi.dev,x+y=z",
         "lv_attr":"-wi-XX----", "segtype":"linear", "pool_lv":"", "origin":"", "lv_active":"unknown",
         "lv_path":"/dev/vg0/kv-a", "data_percent":"", "lv_health_status":""},
        {"lv_name":"pool", "vg_name":"vg0", "lv_size":"1073741824", "lv_tags":"",
         "lv_attr":"twi-a-tz--", "segtype":"thin-pool", "pool_lv":"", "origin":"", "lv_active":"active",
         "lv_path":"", "data_percent":"12.50", "lv_health_status":""}
    ]}]}"#;
    let doc: Report<LvReport> = serde_json::from_str(json).expect("test setup");
    let rows: Vec<LvRow> = doc.report.into_iter().flat_map(|r| r.lv).collect();
    assert_eq!(rows[0].lv_size, 100 << 20);
    assert_eq!(rows[0].lv_tags, vec!["kennel.csi.dev", "x+y=z"]);
    assert_eq!(rows[0].data_percent, None);
    assert!(rows[1].is_thin_pool());
    assert_eq!(rows[1].data_percent, Some(12.5));
    assert!(rows[1].lv_tags.is_empty());
}

#[test]
fn failures_map_to_domain_errors_and_keep_the_message() {
    let err = classify(
        "lvcreate",
        "exit status: 5",
        "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n  Volume group \"vg\" has insufficient free space (483 extents): 10240 required.\n",
    );
    match err {
        Error::Exhausted(msg) => {
            assert!(msg.contains("10240 required"), "{msg}");
            assert!(!msg.contains("Activation disabled"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        classify(
            "lvcreate",
            "5",
            "Logical Volume \"x\" already exists in volume group \"vg\""
        ),
        Error::AlreadyExists(_)
    ));
    assert!(matches!(
        classify(
            "lvcreate",
            "5",
            "  VG vg metadata on /dev/loop3 (521713 bytes) exceeds maximum metadata size (521472 bytes)\n  Failed to write VG vg.\n"
        ),
        Error::Exhausted(m) if m.contains("metadata area")
    ));
    assert!(matches!(
        classify(
            "lvs",
            "5",
            "Volume group \"nosuch\" not found\nCannot process volume group nosuch"
        ),
        Error::Precondition(_)
    ));
    assert!(matches!(
        classify("lvremove", "5", "Failed to find logical volume \"vg/x\""),
        Error::NotFound(_)
    ));
    assert!(matches!(
        classify(
            "lvcreate",
            "5",
            "Number of stripes (99) must not exceed number of physical volumes (1)"
        ),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        classify(
            "lvcreate",
            "5",
            "Can't create thin-pool without using device-mapper kernel driver."
        ),
        Error::Precondition(_)
    ));
    assert!(matches!(
        classify("lvcreate", "5", "something else"),
        Error::Command { .. }
    ));
}

#[test]
fn commands_carry_the_host_options() {
    let lvm = Lvm::new(true, true);
    let line = lvm.cmd("lvcreate").arg("-n").arg("kv-x").display();
    assert!(
        line.starts_with("lvcreate --driverloaded n --config=activation{"),
        "{line}"
    );
    assert!(line.ends_with("-n kv-x"));
    let plain = Lvm::new(false, false).cmd("lvs").display();
    assert_eq!(plain, "lvs");
    let scoped = Lvm::new(false, false);
    scoped.scope_to(vec!["/dev/loop9".into(), "/dev/sdb".into()]);
    assert_eq!(
        scoped.reader().cmd("lvs").display(),
        "lvs --devices /dev/loop9 --devices /dev/sdb",
        "every command, readers' too, scans only the VGs' PVs"
    );
}

#[test]
fn lvm2_changes_are_waited_for_past_their_deadline_and_reports_are_killed() {
    // `sleep` stands in for lvm2: a change that outlives its deadline runs to its end.
    let change = LvmCmd {
        tool: "sleep",
        args: vec!["1".into()],
        timeout: Duration::from_millis(200),
    };
    let started = Instant::now();
    change.run().expect("a change is waited for");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let lvm = Lvm::new(true, true);
    lvm.change(LvmCmd {
        tool: "sleep",
        args: vec!["0.5".into()],
        timeout: Duration::from_millis(100),
    })
    .expect("a counted change is waited for too");
    assert_eq!(lvm.steps.load(Ordering::SeqCst), 1);

    // A report (how `lvs`, `vgs` and `pvs` run) is killed at its deadline and named.
    let report = LvmCmd {
        tool: "sleep",
        args: vec!["30".into()],
        timeout: Duration::from_millis(200),
    };
    let started = Instant::now();
    match report.json::<serde_json::Value>() {
        Err(Error::DeadlineExceeded { command, after, .. }) => {
            assert_eq!(command, "sleep 30");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "not killed");
}

#[test]
fn commands_take_the_configured_deadline() {
    let lvm = Lvm::new(false, false);
    assert_eq!(lvm.cmd("lvs").timeout, crate::node::cmd::timeout());
    let lvm = lvm.with_timeout(Duration::from_secs(7));
    assert_eq!(lvm.reader().cmd("lvs").timeout, Duration::from_secs(7));
}
