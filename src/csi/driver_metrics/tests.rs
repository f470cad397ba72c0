use std::sync::Arc;

use prometheus_client::registry::Registry;
use tonic::codegen::http;
use tonic::{Code, Status};

use super::rpc_layer::{response_code, response_message};
use super::*;
use crate::backend::PoolCapacity;
use crate::metrics_endpoint::Exporter;

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("text encoding");
    out
}

#[test]
fn rpc_names_and_codes() {
    assert_eq!(rpc_name("/csi.v1.Controller/CreateVolume"), "CreateVolume");
    assert_eq!(rpc_name(""), "unknown");
    assert_eq!(code_name(Code::NotFound), "NotFound");
    let telemetry = Arc::new(Telemetry::default());
    let m = &telemetry.rpc;
    m.record("DeleteVolume", Code::Ok, 0.002);
    m.record("NodeStageVolume", Code::NotFound, 0.001);
    assert_eq!(m.calls("NodeStageVolume"), 1);
    assert_eq!(m.errors("NodeStageVolume", Code::NotFound), 1);
    assert_eq!(m.errors("DeleteVolume", Code::NotFound), 0);
    let out = text(DriverExporter::new(telemetry.clone(), "loop").registry());
    assert!(
        out.contains("kennel_csi_rpc_errors_total{rpc=\"NodeStageVolume\",code=\"NotFound\"} 1\n")
    );
    assert!(out.contains("kennel_csi_rpc_duration_seconds_count{rpc=\"DeleteVolume\"} 1\n"));
    assert!(out.contains("kennel_csi_rpc_total{rpc=\"DeleteVolume\"} 1\n"));
    assert!(out.contains("kennel_build_info{version=\""), "{out}");
    // Nothing observed yet: the backend is not reported up, and not ready.
    assert!(
        out.contains("kennel_backend_up{backend=\"loop\"} 0\n"),
        "{out}"
    );
}

#[test]
fn gauges_come_from_the_observation() {
    let telemetry = Arc::new(Telemetry::default());
    let exporter = DriverExporter::new(telemetry.clone(), "lvm");
    assert!(exporter.ready().is_err());
    let pool = PoolCapacity {
        total_bytes: 100,
        available_bytes: 60,
        provisioned_bytes: 40,
    };
    telemetry.store(Observation {
        answer: Ok(()),
        volumes: [("fast".to_owned(), (2, 40))].into(),
        pools: [("fast".to_owned(), pool)].into(),
        claims: [("v1".to_owned(), "ns/data-0".to_owned())].into(),
        conditions: [
            ("v1".to_owned(), None),
            (
                "v2".to_owned(),
                Some("thin pool vg/pool is out of data space".to_owned()),
            ),
        ]
        .into(),
    });
    assert_eq!(exporter.ready(), Ok(()));
    assert_eq!(telemetry.claim("v1").as_deref(), Some("ns/data-0"));
    let out = text(exporter.registry());
    for line in [
        "kennel_backend_up{backend=\"lvm\"} 1\n",
        "kennel_volumes{backend=\"lvm\",class=\"fast\"} 2\n",
        "kennel_volume_bytes{backend=\"lvm\",class=\"fast\"} 40\n",
        "kennel_pool_free_bytes{backend=\"lvm\",device_class=\"fast\"} 60\n",
        "# TYPE kennel_pool_capacity_bytes gauge\n",
        "kennel_volume_condition{backend=\"lvm\",volume_id=\"v1\",claim=\"ns/data-0\",message=\"volume is healthy\"} 0\n",
        "kennel_volume_condition{backend=\"lvm\",volume_id=\"v2\",claim=\"\",message=\"thin pool vg/pool is out of data space\"} 1\n",
    ] {
        assert!(out.contains(line), "{line} missing from\n{out}");
    }
    telemetry.store(Observation {
        answer: Err("lvm backend does not answer: vgs timed out".into()),
        ..telemetry.observation().expect("an observation")
    });
    assert!(exporter.ready().unwrap_err().contains("vgs timed out"));
    assert!(text(exporter.registry()).contains("kennel_backend_up{backend=\"lvm\"} 0\n"));
}

#[test]
fn error_status_is_read_from_headers() {
    let ok = http::Response::new(());
    assert_eq!(response_code(&ok), Code::Ok);
    let err = Status::not_found("volume 50% gone").into_http::<()>();
    assert_eq!(response_code(&err), Code::NotFound);
    assert_eq!(response_message(&err), "volume 50% gone");
}
