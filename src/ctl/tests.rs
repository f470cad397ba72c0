use serde_json::json;

use super::execute::plugin_capability_name;
use super::render::{fields_text, volumes_table};
use super::*;

#[test]
fn volumes_print_as_a_table() {
    let value = json!({
        "volumes": [
            {
                "volume_id": "kv-a", "capacity_bytes": 67108864, "claim": "shop/data-db-0",
                "pv": "pvc-1", "node": "n1", "abnormal": false, "condition": "volume is healthy",
                "volume_context": {"type": "thin", "kennel.csi.dev/node": "n1"},
                "node_state": {"attached": true, "staged": true, "published": 1, "fs_type": "ext4"},
            },
            {
                "volume_id": "kv-b", "capacity_bytes": 1073741824, "claim": null,
                "pv": null, "node": "n1", "abnormal": true, "condition": "image missing",
                "volume_context": {},
                "node_state": {"attached": false, "staged": false, "published": 0, "fs_type": null},
            },
        ],
        "next_token": "",
    });
    assert_eq!(
        volumes_table(&value, false),
        "ID     SIZE     TYPE   CLAIM            STATE           CONDITION\n\
         kv-a   64 MiB   ext4   shop/data-db-0   published (1)   healthy\n\
         kv-b   1 GiB    -      -                -               image missing\n"
    );
    let wide = volumes_table(&value, true);
    assert!(wide.starts_with("ID "), "{wide}");
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .ends_with("PV      NODE   PARAMETERS"),
        "{wide}"
    );
    assert!(wide.contains("pvc-1   n1     type=thin"), "{wide}");
    assert_eq!(
        volumes_table(&json!({"volumes": []}), false),
        "No volumes.\n"
    );
}

#[test]
fn fields_are_readable() {
    let out = fields_text(&json!({
        "available_bytes": 201326592u64,
        "maximum_volume_size": 201326592u64,
        "ready": true,
        "plugin_capabilities": ["CONTROLLER_SERVICE", "VOLUME_EXPANSION_ONLINE"],
    }));
    assert!(out.contains("available:           192 MiB\n"), "{out}");
    assert!(out.contains("maximum_volume_size: 192 MiB\n"), "{out}");
    assert!(out.contains("ready:               yes\n"), "{out}");
    assert!(
        out.contains("CONTROLLER_SERVICE, VOLUME_EXPANSION_ONLINE"),
        "{out}"
    );
    assert!(!out.contains("Some("), "{out}");
}

#[test]
fn plugin_capabilities_have_stable_names() {
    use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
    let service = pb::PluginCapability {
        r#type: Some(Type::Service(Service {
            r#type: service::Type::ControllerService as i32,
        })),
    };
    assert_eq!(plugin_capability_name(&service), "CONTROLLER_SERVICE");
    let online = pb::PluginCapability {
        r#type: Some(Type::VolumeExpansion(VolumeExpansion {
            r#type: volume_expansion::Type::Online as i32,
        })),
    };
    assert_eq!(plugin_capability_name(&online), "VOLUME_EXPANSION_ONLINE");
}
