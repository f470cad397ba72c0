//! Identity and Controller services against the real driver: every rule of
//! the CSI spec Kennel promises, asserted by status code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use crate::common::*;
use kennel::csi::pb::{
    self, controller_service_capability, plugin_capability, volume_capability::access_mode::Mode,
};
use tonic::Code;

const T: u64 = 120;

fn controller_rpcs(resp: &pb::ControllerGetCapabilitiesResponse) -> BTreeSet<i32> {
    resp.capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(rpc)) => Some(rpc.r#type),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------- Identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_plugin_info_reports_name_and_crate_version() {
    with_timeout(T, async {
        let td = TestDriver::start().await;
        let info = td
            .identity()
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
        assert_eq!(info.name, DRIVER_NAME);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_plugin_capabilities_and_probe() {
    with_timeout(T, async {
        let td = TestDriver::start().await;
        let caps = td
            .identity()
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        let services: BTreeSet<i32> = caps
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        use plugin_capability::service::Type as S;
        assert!(
            services.contains(&(S::ControllerService as i32)),
            "{caps:?}"
        );
        assert!(
            services.contains(&(S::VolumeAccessibilityConstraints as i32)),
            "{caps:?}"
        );
        let online = caps.iter().any(|c| {
            matches!(&c.r#type, Some(plugin_capability::Type::VolumeExpansion(e))
                if e.r#type == plugin_capability::volume_expansion::Type::Online as i32)
        });
        assert!(online, "online expansion not advertised: {caps:?}");

        let probe = td
            .identity()
            .probe(pb::ProbeRequest {})
            .await
            .expect("Probe")
            .into_inner();
        assert_ne!(probe.ready, Some(false));
    })
    .await
}

// ------------------------------------------------------ Controller caps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_get_capabilities_lists_what_is_served() {
    with_timeout(T, async {
        let td = TestDriver::start().await;
        let resp = td
            .controller()
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities")
            .into_inner();
        let rpcs = controller_rpcs(&resp);
        use controller_service_capability::rpc::Type as R;
        for wanted in [
            R::CreateDeleteVolume,
            R::ListVolumes,
            R::GetCapacity,
            R::ExpandVolume,
            R::GetVolume,
        ] {
            assert!(
                rpcs.contains(&(wanted as i32)),
                "{wanted:?} missing: {resp:?}"
            );
        }
        // ControllerPublish is not served, so it must not be advertised.
        assert!(!rpcs.contains(&(R::PublishUnpublishVolume as i32)));

        assert_code(
            td.controller()
                .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                    volume_id: UNKNOWN_ID.into(),
                    node_id: td.opts.node_id.clone(),
                    volume_capability: Some(mount_cap("")),
                    ..Default::default()
                })
                .await,
            Code::Unimplemented,
            "ControllerPublishVolume",
        );
    })
    .await
}

// ---------------------------------------------------------- CreateVolume

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_by_name() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let req = create_req("pvc-idem", 16 * MIB, vec![mount_cap("ext4")]);
        let first = td
            .controller()
            .create_volume(req.clone())
            .await
            .expect("first CreateVolume")
            .into_inner();
        let second = td
            .controller()
            .create_volume(req)
            .await
            .expect("second CreateVolume")
            .into_inner();
        assert_eq!(
            first, second,
            "a repeated CreateVolume must return the same volume"
        );
        let vol = first.volume.unwrap();
        assert!(is_volume_id(&vol.volume_id), "bad id {:?}", vol.volume_id);
        assert_eq!(vol.capacity_bytes, 16 * MIB);
        assert_eq!(td.list_all().await.len(), 1);
        // Same name with no capacity range at all is compatible too.
        let again = td
            .controller()
            .create_volume(pb::CreateVolumeRequest {
                name: "pvc-idem".into(),
                volume_capabilities: vec![mount_cap("ext4")],
                ..Default::default()
            })
            .await
            .expect("CreateVolume without range")
            .into_inner();
        assert_eq!(again.volume.unwrap().volume_id, vol.volume_id);
        // Exactly one volume in the pool.
        assert_eq!(td.stored_volumes().len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_same_name_incompatible_is_already_exists() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        td.create("pvc-a", 16 * MIB, mount_cap("ext4")).await;
        assert_code(
            td.controller()
                .create_volume(create_req("pvc-a", 32 * MIB, vec![mount_cap("ext4")]))
                .await,
            Code::AlreadyExists,
            "same name, bigger required size",
        );
        let mut smaller_limit = create_req("pvc-a", 4 * MIB, vec![mount_cap("ext4")]);
        smaller_limit.capacity_range.as_mut().unwrap().limit_bytes = 8 * MIB;
        assert_code(
            td.controller().create_volume(smaller_limit).await,
            Code::AlreadyExists,
            "same name, limit below the existing size",
        );
        assert_code(
            td.controller()
                .create_volume(create_req("pvc-a", 16 * MIB, vec![block_cap()]))
                .await,
            Code::AlreadyExists,
            "same name, Block instead of Filesystem",
        );
        assert_eq!(td.list_all().await.len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_missing_name_or_capabilities_is_invalid() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        assert_code(
            td.controller()
                .create_volume(create_req("", 16 * MIB, vec![mount_cap("")]))
                .await,
            Code::InvalidArgument,
            "missing name",
        );
        assert_code(
            td.controller()
                .create_volume(create_req("pvc-nocaps", 16 * MIB, vec![]))
                .await,
            Code::InvalidArgument,
            "missing capabilities",
        );
        let no_access_type = pb::VolumeCapability {
            access_type: None,
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert_code(
            td.controller()
                .create_volume(create_req("pvc-noat", 16 * MIB, vec![no_access_type]))
                .await,
            Code::InvalidArgument,
            "capability without access type",
        );
        let no_mode = pb::VolumeCapability {
            access_type: Some(mount_type("")),
            access_mode: None,
        };
        assert_code(
            td.controller()
                .create_volume(create_req("pvc-nomode", 16 * MIB, vec![no_mode]))
                .await,
            Code::InvalidArgument,
            "capability without access mode",
        );
        assert_code(
            td.controller()
                .create_volume(create_req("pvc-ntfs", 16 * MIB, vec![mount_cap("ntfs")]))
                .await,
            Code::InvalidArgument,
            "unsupported fs_type",
        );
        assert!(td.list_all().await.is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_multi_node_modes_are_invalid() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            for (kind, access_type) in [("mount", mount_type("")), ("block", block_type())] {
                let name = format!("pvc-{}-{kind}", mode as i32);
                assert_code(
                    td.controller()
                        .create_volume(create_req(&name, 16 * MIB, vec![cap(access_type, mode)]))
                        .await,
                    Code::InvalidArgument,
                    &format!("{mode:?} {kind}"),
                );
            }
        }
        // One supported and one MULTI_NODE capability: still refused.
        assert_code(
            td.controller()
                .create_volume(create_req(
                    "pvc-mixed",
                    16 * MIB,
                    vec![
                        mount_cap(""),
                        cap(mount_type(""), Mode::MultiNodeMultiWriter),
                    ],
                ))
                .await,
            Code::InvalidArgument,
            "mixed single and multi node",
        );
        // Every single-node mode is accepted.
        for (i, mode) in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ]
        .into_iter()
        .enumerate()
        {
            td.create(
                &format!("pvc-single-{i}"),
                4 * MIB,
                cap(mount_type(""), mode),
            )
            .await;
        }
        assert_eq!(td.list_all().await.len(), 4);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_limit_below_required_is_out_of_range() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let mut req = create_req("pvc-range", 32 * MIB, vec![mount_cap("")]);
        req.capacity_range.as_mut().unwrap().limit_bytes = 16 * MIB;
        assert_code(
            td.controller().create_volume(req).await,
            Code::OutOfRange,
            "limit < required",
        );
        // No 1 MiB multiple lies in [1 MiB + 1, 2 MiB - 1].
        let mut req = create_req("pvc-gap", MIB + 1, vec![block_cap()]);
        req.capacity_range.as_mut().unwrap().limit_bytes = 2 * MIB - 1;
        assert_code(
            td.controller().create_volume(req).await,
            Code::OutOfRange,
            "range containing no MiB multiple",
        );
        // xfs cannot be made below 300 MiB: a limit under that is impossible.
        let mut req = create_req("pvc-xfs-small", 16 * MIB, vec![mount_cap("xfs")]);
        req.capacity_range.as_mut().unwrap().limit_bytes = 100 * MIB;
        assert_code(
            td.controller().create_volume(req).await,
            Code::OutOfRange,
            "xfs under its minimum size",
        );
        assert!(td.list_all().await.is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_pool_full_is_resource_exhausted() {
    with_timeout(T, async {
        for opts in DriverOpts::each_provisioning("64MiB") {
            let td = TestDriver::start_with(opts.clone()).await;
            assert_code(
                td.controller()
                    .create_volume(create_req("pvc-huge", 128 * MIB, vec![block_cap()]))
                    .await,
                Code::ResourceExhausted,
                &format!("{}: volume larger than the pool", opts.label()),
            );
            td.create("pvc-1", 48 * MIB, block_cap()).await;
            assert_code(
                td.controller()
                    .create_volume(create_req("pvc-2", 32 * MIB, vec![block_cap()]))
                    .await,
                Code::ResourceExhausted,
                &format!("{}: pool full", opts.label()),
            );
            // What is left still fits exactly.
            td.create("pvc-3", 16 * MIB, block_cap()).await;
            assert_eq!(td.available_capacity(None).await, 0);
            // Failed creates left nothing behind.
            let names = td.host_objects();
            assert_eq!(names.len(), 2 * td.objects_per_volume(), "{names:?}");
            assert_eq!(td.list_all().await.len(), 2);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_rounds_capacity_up_to_mib() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let cases = [
            (1, 0, MIB),
            (MIB, 0, MIB),
            (5 * MIB + 1, 0, 6 * MIB),
            (5 * MIB + 1, 6 * MIB, 6 * MIB),
            (10 * MIB - 4096, 0, 10 * MIB),
        ];
        for (i, (required, limit, expected)) in cases.into_iter().enumerate() {
            let mut req = create_req(&format!("pvc-round-{i}"), required, vec![block_cap()]);
            req.capacity_range.as_mut().unwrap().limit_bytes = limit;
            let vol = td
                .controller()
                .create_volume(req)
                .await
                .unwrap_or_else(|s| panic!("required {required} limit {limit}: {s:?}"))
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(
                vol.capacity_bytes, expected,
                "required {required} limit {limit}"
            );
            assert_eq!(
                td.stored_size(&vol.volume_id),
                Some(expected as u64),
                "stored size"
            );
        }
        // Only a limit: some size within it.
        let mut req = create_req("pvc-limit-only", 0, vec![block_cap()]);
        req.capacity_range.as_mut().unwrap().limit_bytes = 10 * MIB;
        let vol = td
            .controller()
            .create_volume(req)
            .await
            .expect("limit only")
            .into_inner()
            .volume
            .unwrap();
        assert!(vol.capacity_bytes > 0 && vol.capacity_bytes <= 10 * MIB);
        assert_eq!(vol.capacity_bytes % MIB, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_topology() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let vol = td.create("pvc-topo", 4 * MIB, mount_cap("")).await;
        assert_eq!(
            vol.accessible_topology,
            vec![pb::Topology {
                segments: td.own_segment()
            }]
        );

        let requirement = |nodes: &[&str]| pb::TopologyRequirement {
            requisite: nodes
                .iter()
                .map(|n| pb::Topology {
                    segments: segment(n),
                })
                .collect(),
            preferred: nodes
                .iter()
                .map(|n| pb::Topology {
                    segments: segment(n),
                })
                .collect(),
        };
        let mut req = create_req("pvc-elsewhere", 4 * MIB, vec![mount_cap("")]);
        req.accessibility_requirements = Some(requirement(&["other-node", "third-node"]));
        assert_code(
            td.controller().create_volume(req).await,
            Code::ResourceExhausted,
            "requisite topology excluding this node",
        );
        let mut req = create_req("pvc-here", 4 * MIB, vec![mount_cap("")]);
        req.accessibility_requirements =
            Some(requirement(&["other-node", td.opts.node_id.as_str()]));
        let vol = td
            .controller()
            .create_volume(req)
            .await
            .expect("requisite including this node")
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(
            vol.accessible_topology,
            vec![pb::Topology {
                segments: td.own_segment()
            }]
        );
        let names: BTreeSet<String> = td
            .list_all()
            .await
            .into_iter()
            .map(|v| v.volume_id)
            .collect();
        assert_eq!(names.len(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_unknown_parameter_is_invalid() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let mut req = create_req("pvc-param", 4 * MIB, vec![mount_cap("")]);
        req.parameters = BTreeMap::from([("mkfsDiscrad".to_owned(), "true".to_owned())]);
        assert_code(
            td.controller().create_volume(req).await,
            Code::InvalidArgument,
            "unknown StorageClass parameter",
        );
        let mut req = create_req("pvc-param", 4 * MIB, vec![mount_cap("")]);
        req.parameters = BTreeMap::from([("mkfsDiscard".to_owned(), "maybe".to_owned())]);
        assert_code(
            td.controller().create_volume(req).await,
            Code::InvalidArgument,
            "bad parameter value",
        );
        // The provisioner's metadata parameters are accepted.
        let mut req = create_req("pvc-param", 4 * MIB, vec![mount_cap("")]);
        req.parameters = BTreeMap::from([
            (
                "csi.storage.k8s.io/pvc/name".to_owned(),
                "www-web-0".to_owned(),
            ),
            (
                "csi.storage.k8s.io/pvc/namespace".to_owned(),
                "default".to_owned(),
            ),
            (
                "csi.storage.k8s.io/pv/name".to_owned(),
                "pvc-param".to_owned(),
            ),
        ]);
        td.controller()
            .create_volume(req)
            .await
            .expect("provisioner metadata parameters");
    })
    .await
}

// ---------------------------------------------------------- DeleteVolume

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_unknown_or_malformed_is_ok_and_touches_nothing() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        // Decoys where a path-joining driver would land.
        let decoys = [
            td.root.join("decoy.img"),
            td.root.join("decoy.json"),
            td.root.join("decoy"),
        ];
        for d in &decoys {
            fs::write(d, b"do not delete").unwrap();
        }
        let kept = td.create("pvc-keep", 4 * MIB, mount_cap("")).await;
        let before = td.host_objects();

        for id in [
            UNKNOWN_ID,
            "../../etc",
            "../decoy",
            "kv-../decoy",
            "/etc/passwd",
            "kv-0000000000000000000000000000",
            "KV-000000000000000000000000",
        ] {
            td.controller()
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.to_owned(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("DeleteVolume {id:?}: {s:?}"));
        }
        for d in &decoys {
            assert_eq!(fs::read(d).unwrap(), b"do not delete", "{}", d.display());
        }
        assert!(std::path::Path::new("/etc/passwd").exists());
        let after = td.host_objects();
        assert_eq!(before, after);
        assert_eq!(td.list_all().await, vec![kept.clone()]);

        assert_code(
            td.controller()
                .delete_volume(pb::DeleteVolumeRequest::default())
                .await,
            Code::InvalidArgument,
            "DeleteVolume without id",
        );

        // A real delete, twice.
        td.delete(&kept.volume_id).await;
        td.delete(&kept.volume_id).await;
        assert!(td.list_all().await.is_empty());
        assert!(!td.stored(&kept.volume_id));
        let leftovers: Vec<_> = td
            .host_objects()
            .into_iter()
            .filter(|n| n.contains(&kept.volume_id))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // The name is free again and gets a new volume.
        let fresh = td.create("pvc-keep", 4 * MIB, mount_cap("")).await;
        assert_ne!(fresh.volume_id, kept.volume_id);
    })
    .await
}

// -------------------------------------------- ValidateVolumeCapabilities

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let vol = td.create("pvc-validate", 4 * MIB, mount_cap("ext4")).await;
        let validate =
            |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.to_owned(),
                volume_capabilities: caps,
                ..Default::default()
            };

        assert_code(
            td.controller()
                .validate_volume_capabilities(validate(UNKNOWN_ID, vec![mount_cap("")]))
                .await,
            Code::NotFound,
            "unknown volume",
        );
        assert_code(
            td.controller()
                .validate_volume_capabilities(validate("../../etc", vec![mount_cap("")]))
                .await,
            Code::NotFound,
            "malformed volume id",
        );
        assert_code(
            td.controller()
                .validate_volume_capabilities(validate("", vec![mount_cap("")]))
                .await,
            Code::InvalidArgument,
            "missing volume id",
        );
        assert_code(
            td.controller()
                .validate_volume_capabilities(validate(&vol.volume_id, vec![]))
                .await,
            Code::InvalidArgument,
            "missing capabilities",
        );

        let supported = vec![
            mount_cap("ext4"),
            cap(mount_type(""), Mode::SingleNodeReaderOnly),
        ];
        let resp = td
            .controller()
            .validate_volume_capabilities(validate(&vol.volume_id, supported.clone()))
            .await
            .expect("ValidateVolumeCapabilities")
            .into_inner();
        let confirmed = resp
            .confirmed
            .expect("supported capabilities are confirmed");
        assert_eq!(confirmed.volume_capabilities, supported);

        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let resp = td
                .controller()
                .validate_volume_capabilities(validate(
                    &vol.volume_id,
                    vec![cap(mount_type("ext4"), mode)],
                ))
                .await
                .expect("ValidateVolumeCapabilities MULTI_NODE")
                .into_inner();
            assert!(resp.confirmed.is_none(), "{mode:?} must not be confirmed");
        }
        // Another filesystem than the volume carries is not confirmed either.
        let resp = td
            .controller()
            .validate_volume_capabilities(validate(&vol.volume_id, vec![mount_cap("xfs")]))
            .await
            .expect("ValidateVolumeCapabilities xfs")
            .into_inner();
        assert!(resp.confirmed.is_none());
    })
    .await
}

// ----------------------------------------------------------- ListVolumes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paginates_over_every_volume_once() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let mut created = BTreeSet::new();
        for i in 0..7 {
            let v = td
                .create(&format!("pvc-list-{i}"), 2 * MIB, mount_cap(""))
                .await;
            created.insert(v.volume_id);
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let resp = td
                .controller()
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 3,
                    starting_token: token.clone(),
                })
                .await
                .expect("ListVolumes page")
                .into_inner();
            pages += 1;
            assert!(resp.entries.len() <= 3, "page of {}", resp.entries.len());
            for e in &resp.entries {
                let v = e.volume.as_ref().expect("entry has a volume");
                seen.push(v.volume_id.clone());
                if let Some(status) = &e.status {
                    if let Some(cond) = &status.volume_condition {
                        assert!(!cond.abnormal, "{cond:?}");
                    }
                }
            }
            if resp.next_token.is_empty() {
                break;
            }
            token = resp.next_token;
            assert!(pages < 10, "pagination does not end");
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 7, "{seen:?}");
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique, created);

        // max_entries 0: everything in one page.
        let all = td
            .controller()
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes all")
            .into_inner();
        assert_eq!(all.entries.len(), 7);
        assert!(all.next_token.is_empty());

        assert_code(
            td.controller()
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: "not-a-token".into(),
                })
                .await,
            Code::Aborted,
            "bad starting token",
        );
        assert_code(
            td.controller()
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: -1,
                    starting_token: String::new(),
                })
                .await,
            Code::InvalidArgument,
            "negative max_entries",
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_token_survives_deleting_the_cursor_volume() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        for i in 0..5 {
            td.create(&format!("pvc-cursor-{i}"), 2 * MIB, mount_cap(""))
                .await;
        }
        let first = td
            .controller()
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.entries.len(), 2);
        assert!(!first.next_token.is_empty());
        let last = first.entries[1].volume.as_ref().unwrap().volume_id.clone();
        td.delete(&last).await;
        let rest = td
            .controller()
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 0,
                starting_token: first.next_token,
            })
            .await
            .expect("next page after the cursor volume was deleted")
            .into_inner();
        assert_eq!(rest.entries.len(), 3);
    })
    .await
}

// ----------------------------------------------------------- GetCapacity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_tracks_volumes_and_topology() {
    with_timeout(T, async {
        for opts in DriverOpts::each_provisioning("256MiB") {
            let td = TestDriver::start_with(opts.clone()).await;
            let what = opts.label();
            let empty = td.available_capacity(None).await;
            assert_eq!(empty, 256 * MIB, "{what}: empty pool");
            assert_eq!(td.available_capacity(Some(td.own_segment())).await, empty);
            assert_eq!(
                td.available_capacity(Some(segment("some-other-node")))
                    .await,
                0,
                "{what}: foreign topology segment"
            );

            let vol = td.create("pvc-cap", 16 * MIB, mount_cap("")).await;
            assert_eq!(
                td.available_capacity(None).await,
                empty - 16 * MIB,
                "{what}"
            );
            td.controller()
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .expect("expand");
            assert_eq!(
                td.available_capacity(None).await,
                empty - 32 * MIB,
                "{what}"
            );
            td.delete(&vol.volume_id).await;
            assert_eq!(
                td.available_capacity(None).await,
                empty,
                "{what}: after delete"
            );

            // MULTI_NODE capability: no room at all.
            let resp = td
                .controller()
                .get_capacity(pb::GetCapacityRequest {
                    volume_capabilities: vec![cap(mount_type(""), Mode::MultiNodeMultiWriter)],
                    ..Default::default()
                })
                .await
                .expect("GetCapacity MULTI_NODE")
                .into_inner();
            assert_eq!(resp.available_capacity, 0);
        }
    })
    .await
}

// ------------------------------------------------ ControllerExpandVolume

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_expand_volume() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
        let vol = td.create("pvc-grow", 16 * MIB, mount_cap("ext4")).await;
        let expand =
            |id: &str, range: Option<pb::CapacityRange>| pb::ControllerExpandVolumeRequest {
                volume_id: id.to_owned(),
                capacity_range: range,
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            };
        let range = |required: i64, limit: i64| {
            Some(pb::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            })
        };
        let resp = td
            .controller()
            .controller_expand_volume(expand(&vol.volume_id, range(32 * MIB + 1, 0)))
            .await
            .expect("ControllerExpandVolume")
            .into_inner();
        assert_eq!(resp.capacity_bytes, 33 * MIB);
        assert!(
            resp.node_expansion_required,
            "a filesystem volume grows on the node too"
        );
        assert_eq!(td.stored_size(&vol.volume_id), Some(33 * MIB as u64));
        // Idempotent, and never shrinks.
        let again = td
            .controller()
            .controller_expand_volume(expand(&vol.volume_id, range(32 * MIB + 1, 0)))
            .await
            .expect("repeated ControllerExpandVolume")
            .into_inner();
        assert_eq!(again.capacity_bytes, 33 * MIB);
        let smaller = td
            .controller()
            .controller_expand_volume(expand(&vol.volume_id, range(8 * MIB, 0)))
            .await
            .expect("expand to a smaller size")
            .into_inner();
        assert!(smaller.capacity_bytes >= 33 * MIB);

        let got = td
            .controller()
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.volume.unwrap().capacity_bytes, 33 * MIB);

        assert_code(
            td.controller()
                .controller_expand_volume(expand(UNKNOWN_ID, range(64 * MIB, 0)))
                .await,
            Code::NotFound,
            "expand unknown volume",
        );
        assert_code(
            td.controller()
                .controller_expand_volume(expand("../../etc", range(64 * MIB, 0)))
                .await,
            Code::NotFound,
            "expand malformed id",
        );
        assert_code(
            td.controller()
                .controller_expand_volume(expand(&vol.volume_id, None))
                .await,
            Code::InvalidArgument,
            "expand without capacity range",
        );
        assert_code(
            td.controller()
                .controller_expand_volume(expand("", range(64 * MIB, 0)))
                .await,
            Code::InvalidArgument,
            "expand without volume id",
        );
        assert_code(
            td.controller()
                .controller_expand_volume(expand(&vol.volume_id, range(64 * MIB, 48 * MIB)))
                .await,
            Code::OutOfRange,
            "expand with limit < required",
        );
        assert_code(
            td.controller()
                .controller_expand_volume(expand(&vol.volume_id, range(1024 * MIB, 0)))
                .await,
            Code::ResourceExhausted,
            "expand beyond the pool",
        );
    })
    .await
}

// --------------------------------------------------- ControllerGetVolume

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_get_volume() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let vol = td.create("pvc-get", 8 * MIB, block_cap()).await;
        let resp = td
            .controller()
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        assert_eq!(resp.volume.as_ref(), Some(&vol));
        let condition = resp
            .status
            .expect("status")
            .volume_condition
            .expect("volume condition");
        assert!(!condition.abnormal, "{condition:?}");

        for id in [UNKNOWN_ID, "../../etc"] {
            assert_code(
                td.controller()
                    .controller_get_volume(pb::ControllerGetVolumeRequest {
                        volume_id: id.to_owned(),
                    })
                    .await,
                Code::NotFound,
                &format!("ControllerGetVolume {id:?}"),
            );
        }
    })
    .await
}

/// The I/O limits a volume stores, as the backend keeps them on the host: the
/// loop backend's record file, or the LV's short `kio=` tag; as `rb10485760+wi100`.
fn stored_io_limits(td: &TestDriver, id: &str) -> String {
    match &td.vg {
        None => {
            let record = fs::read_to_string(td.loop_dir.join(format!("{id}.json"))).unwrap();
            let record: serde_json::Value = serde_json::from_str(&record).unwrap();
            let limits = &record["params"]["io_limits"];
            ["read_bps", "write_bps", "read_iops", "write_iops"]
                .iter()
                .zip(["rb", "wb", "ri", "wi"])
                .filter_map(|(k, short)| Some(format!("{short}{}", limits[*k].as_u64()?)))
                .collect::<Vec<_>>()
                .join("+")
        }
        Some(vg) => vg
            .lv(id)
            .expect("the LV")
            .tags
            .iter()
            .find_map(|t| t.strip_prefix("kio=").map(tag_numbers))
            .unwrap_or_default(),
    }
}

/// An LV's `kio=` value with its byte rates' binary suffixes (`rb10m`) written out.
fn tag_numbers(value: &str) -> String {
    value
        .split('+')
        .map(|part| {
            let (key, raw) = part.split_at(2);
            let (digits, shift) = match raw.strip_suffix(|c: char| c.is_ascii_alphabetic()) {
                Some(digits) => {
                    let suffix = raw.chars().last().unwrap();
                    let at = "kmgtpe".find(suffix).expect("a binary suffix");
                    (digits, 10 * (at as u32 + 1))
                }
                None => (raw, 0),
            };
            let number: u64 = digits.parse().expect("a number");
            format!("{key}{}", number << shift)
        })
        .collect::<Vec<_>>()
        .join("+")
}

fn modify_req(id: &str, pairs: &[(&str, &str)]) -> pb::ControllerModifyVolumeRequest {
    pb::ControllerModifyVolumeRequest {
        volume_id: id.to_owned(),
        mutable_parameters: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// ModifyVolume (VolumeAttributesClass): I/O limits given at creation and
/// changed later are stored with the volume and survive a restart; a key
/// left out keeps its value, 0 removes one; unknown keys and bad values are
/// INVALID_ARGUMENT naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_volume_stores_io_limits_durably() {
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let caps = td
            .controller()
            .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        use controller_service_capability::rpc::Type as R;
        assert!(controller_rpcs(&caps).contains(&(R::ModifyVolume as i32)));

        let mut req = create_req("pvc-limits", 16 * MIB, vec![mount_cap("ext4")]);
        req.mutable_parameters = [("readBytesPerSeconds".to_owned(), "1".to_owned())].into();
        let refused = td.controller().create_volume(req.clone()).await;
        let status = refused.expect_err("unknown mutable parameter");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("readBytesPerSeconds"),
            "{status:?}"
        );

        req.mutable_parameters = [("readBytesPerSecond".to_owned(), "10Mi".to_owned())].into();
        let id = td
            .controller()
            .create_volume(req)
            .await
            .expect("create with limits")
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        assert_eq!(stored_io_limits(&td, &id), "rb10485760");

        td.controller()
            .controller_modify_volume(modify_req(&id, &[("writeIOPS", "100")]))
            .await
            .expect("modify");
        assert_eq!(stored_io_limits(&td, &id), "rb10485760+wi100");
        // Again: idempotent.
        td.controller()
            .controller_modify_volume(modify_req(&id, &[("writeIOPS", "100")]))
            .await
            .expect("modify again");

        td.restart().await;
        td.controller()
            .controller_modify_volume(modify_req(
                &id,
                &[("readBytesPerSecond", "0"), ("readIOPS", "1k")],
            ))
            .await
            .expect("modify after a restart");
        assert_eq!(stored_io_limits(&td, &id), "ri1000+wi100");

        for (pairs, names) in [
            (vec![("fsType", "xfs")], "fsType"),
            (vec![("writeIOPS", "lots")], "writeIOPS"),
        ] {
            let status = td
                .controller()
                .controller_modify_volume(modify_req(&id, &pairs))
                .await
                .expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(names), "{status:?}");
        }
        assert_code(
            td.controller()
                .controller_modify_volume(modify_req(&id, &[]))
                .await,
            Code::InvalidArgument,
            "no mutable parameters",
        );
        assert_code(
            td.controller()
                .controller_modify_volume(modify_req("", &[("readIOPS", "1")]))
                .await,
            Code::InvalidArgument,
            "no volume id",
        );
        assert_code(
            td.controller()
                .controller_modify_volume(modify_req(
                    "kv-000000000000000000000000",
                    &[("readIOPS", "1")],
                ))
                .await,
            Code::NotFound,
            "unknown volume",
        );
        assert_eq!(stored_io_limits(&td, &id), "ri1000+wi100");
        td.delete(&id).await;
    })
    .await
}
