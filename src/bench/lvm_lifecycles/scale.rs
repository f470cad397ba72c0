//! `kennel bench --backend lvm --volumes N`: one volume group holding N
//! volumes as Kubernetes asks for them. lvm2 reads and rewrites the VG's
//! whole metadata text on every call, so its call time grows with N; the text
//! must fit in half the PV's metadata area (see `backend::lvm::metadata`).
//! Reports both as the VG fills, then full lifecycles at N volumes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use super::super::{kennel_lifecycle, ms, percentile, report, run_lifecycles, BenchArgs};
use super::{metrics_text, start_lvm_driver, ThrowawayVg};
use crate::backend::lvm::metadata::Area;
use crate::csi::client::CsiClient;
use crate::csi::pb::{self, volume_capability as vc};
use crate::model::volume_size::MIB;

/// Every filler volume is one 4 MiB extent: the VG's space is not the limit.
const FILLER: u64 = 4 * MIB;

pub(in crate::bench) async fn measure(
    args: &BenchArgs,
    dir: &Path,
    volumes: usize,
) -> anyhow::Result<()> {
    ensure!(volumes > 0, "--volumes must be positive");
    let pool = volumes as u64 * FILLER + args.size * args.concurrency as u64 * 2 + 256 * MIB;
    let vg = ThrowawayVg::create(dir, pool, args.metadata_size)?;
    let empty = area(&vg)?;
    println!(
        "kennel bench --backend lvm --volumes {volumes}: volume group {} on {}, metadata area {} KiB \
         (at most {} KiB of text), {} at a time",
        vg.name,
        vg.pv.display(),
        empty.size / 1024,
        empty.max_text() / 1024,
        args.concurrency
    );
    let lvm_dir = dir.join("lvm");
    std::fs::create_dir_all(&lvm_dir)?;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let driver = start_lvm_driver(&lvm_dir, &vg.name, metrics).await?;

    println!(
        "\n  {:>8} {:>16} {:>16} {:>14} {:>12}",
        "volumes", "Create p50 ms", "lvcreate ms", "metadata KiB", "per volume"
    );
    let step = volumes.div_ceil(10);
    let mut created = 0;
    while created < volumes {
        let batch = step.min(volumes - created);
        let before = seconds(metrics, "lvcreate").await?;
        let samples = fill(&driver.client, created, batch, args.concurrency).await?;
        let after = seconds(metrics, "lvcreate").await?;
        created += batch;
        let now = area(&vg)?;
        let used = text_bytes(now);
        let grown = used.saturating_sub(text_bytes(empty));
        println!(
            "  {created:>8} {:>16.1} {:>16.1} {:>14.1} {:>10} B",
            ms(percentile(&samples, 50.0)),
            mean_ms(before, after),
            used as f64 / 1024.0,
            grown / created as u64,
        );
    }

    let before = (
        seconds(metrics, "lvcreate").await?,
        seconds(metrics, "lvremove").await?,
    );
    let (samples, wall) = run_lifecycles(args, args.lifecycles, |i, s| {
        kennel_lifecycle(
            driver.client.clone(),
            lvm_dir.clone(),
            args.size,
            args.filesystem,
            i,
            s,
        )
    })
    .await?;
    let after = (
        seconds(metrics, "lvcreate").await?,
        seconds(metrics, "lvremove").await?,
    );
    drop(driver);
    report(
        &format!("lifecycles with {volumes} volumes in the VG"),
        &samples,
        wall,
        args.lifecycles,
    );
    let full = area(&vg)?;
    println!(
        "\nlvm2 at {volumes} volumes: lvcreate {:.1} ms, lvremove {:.1} ms (mean per call)",
        mean_ms(before.0, after.0),
        mean_ms(before.1, after.1)
    );
    println!(
        "metadata: {:.1} KiB of text, {:.1}% of the {} KiB lvm2 allows in this area; {} bytes per volume",
        text_bytes(full) as f64 / 1024.0,
        100.0 * text_bytes(full) as f64 / full.max_text().max(1) as f64,
        full.max_text() / 1024,
        text_bytes(full).saturating_sub(text_bytes(empty)) / volumes as u64,
    );
    Ok(())
}

/// The VG's metadata area as lvm2 reports it now.
fn area(vg: &ThrowawayVg) -> anyhow::Result<Area> {
    let row = vg
        .lvm
        .vgs(std::slice::from_ref(&vg.name))?
        .into_iter()
        .next()
        .context("vgs reported no VG")?;
    Ok(Area::of(&row))
}

/// Bytes of metadata text in the area (lvm2 reports the room left for one
/// more copy, to the sector).
fn text_bytes(area: Area) -> u64 {
    (area.size.saturating_sub(512) / 2).saturating_sub(area.free)
}

/// Create `count` volumes named like csi-provisioner's, from number `first`;
/// CreateVolume's times.
async fn fill(
    client: &CsiClient,
    first: usize,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Duration>> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(count);
    for i in first..first + count {
        let permit = semaphore.clone().acquire_owned().await?;
        let mut controller = client.controller.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("pvc-8f0e3c2a-1b2c-4d5e-9f00-{i:012x}");
            let parameters: BTreeMap<String, String> = [
                ("csi.storage.k8s.io/pvc/name", format!("data-web-{i}")),
                ("csi.storage.k8s.io/pvc/namespace", "default".to_owned()),
                ("csi.storage.k8s.io/pv/name", name.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let at = Instant::now();
            let result = controller
                .create_volume(pb::CreateVolumeRequest {
                    name,
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: FILLER as i64,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![pb::VolumeCapability {
                        access_type: Some(vc::AccessType::Mount(vc::MountVolume {
                            fs_type: "ext4".into(),
                            ..Default::default()
                        })),
                        access_mode: Some(vc::AccessMode {
                            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
                        }),
                    }],
                    parameters: parameters.into_iter().collect(),
                    ..Default::default()
                })
                .await;
            drop(permit);
            result
                .map(|_| at.elapsed())
                .with_context(|| format!("CreateVolume of filler volume {i}"))
        }));
    }
    let mut samples = Vec::with_capacity(count);
    for task in tasks {
        samples.push(task.await??);
    }
    Ok(samples)
}

/// (sum of seconds, calls) of one lvm2 tool so far, from the driver's metrics.
async fn seconds(addr: std::net::SocketAddr, tool: &str) -> anyhow::Result<(f64, u64)> {
    let text = metrics_text(addr).await?;
    let value = |suffix: &str| -> f64 {
        let prefix = format!("kennel_lvm_command_duration_seconds_{suffix}{{command=\"{tool}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok((value("sum"), value("count") as u64))
}

fn mean_ms(before: (f64, u64), after: (f64, u64)) -> f64 {
    let calls = after.1.saturating_sub(before.1);
    if calls == 0 {
        return 0.0;
    }
    (after.0 - before.0) * 1000.0 / calls as f64
}
