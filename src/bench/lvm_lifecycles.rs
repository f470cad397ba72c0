//! `kennel bench --backend lvm`: the same lifecycles against an LVM-backed
//! driver on a throwaway volume group (a sparse file behind a loop device,
//! removed afterwards), beside the loop backend in the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{kennel_lifecycle, percentile, report, run_lifecycles, BenchArgs, DriverProcess};
use crate::backend::lvm::cli::Lvm;
use crate::backend::lvm::device_mapper_available;
use crate::csi::client::CsiClient;
use crate::model::volume_size::MIB;
use crate::node::loopdev;

mod scale;

pub(super) async fn measure(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    if let Some(volumes) = args.volumes {
        return scale::measure(args, dir, volumes).await;
    }
    ensure!(
        args.metadata_size.is_none(),
        "--metadata-size goes with --volumes"
    );
    let kind = if args.filesystem {
        "ext4 Filesystem"
    } else {
        "Block"
    };
    println!(
        "kennel bench --backend lvm: {} lifecycles of a {} MiB {kind} volume, {} at a time, LVM beside loop",
        args.lifecycles,
        args.size / MIB,
        args.concurrency
    );
    let pool = args.size * args.concurrency as u64 * 2 + 256 * MIB;
    let vg = ThrowawayVg::create(dir, pool, None)?;
    println!(
        "volume group {} on {} ({} MiB, device-mapper: {})",
        vg.name,
        vg.pv.display(),
        pool / MIB,
        if device_mapper_available() {
            "yes"
        } else {
            "no, loop windows"
        }
    );

    let lvm_dir = dir.join("lvm");
    std::fs::create_dir_all(&lvm_dir)?;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let driver = start_lvm_driver(&lvm_dir, &vg.name, metrics).await?;
    let (lvm, lvm_wall, commands) = {
        let run = |count| {
            run_lifecycles(args, count, |i, s| {
                kennel_lifecycle(
                    driver.client.clone(),
                    lvm_dir.clone(),
                    args.size,
                    args.filesystem,
                    i,
                    s,
                )
            })
        };
        run(1).await?;
        let before = lvm_commands(metrics).await?;
        let (samples, wall) = run(args.lifecycles).await?;
        let after = lvm_commands(metrics).await?;
        let commands: BTreeMap<String, u64> = after
            .into_iter()
            .map(|(k, v)| {
                let was = before.get(&k).copied().unwrap_or(0);
                (k, v.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        (samples, wall, commands)
    };
    drop(driver);

    let loop_dir = dir.join("loop-backend");
    std::fs::create_dir_all(&loop_dir)?;
    let driver = DriverProcess::start(&loop_dir, pool).await?;
    let run = |count| {
        run_lifecycles(args, count, |i, s| {
            kennel_lifecycle(
                driver.client.clone(),
                loop_dir.clone(),
                args.size,
                args.filesystem,
                i,
                s,
            )
        })
    };
    run(1).await?;
    let (looped, loop_wall) = run(args.lifecycles).await?;
    drop(driver);

    report("kennel, LVM backend", &lvm, lvm_wall, args.lifecycles);
    report("kennel, loop backend", &looped, loop_wall, args.lifecycles);
    let per = |n: u64| n as f64 / args.lifecycles as f64;
    let total: u64 = commands.values().sum();
    println!(
        "\nlvm2 commands per lifecycle: {:.2} ({})",
        per(total),
        commands
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", per(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let p50 = |m: &BTreeMap<&str, Vec<Duration>>| {
        percentile(m.get("lifecycle").map_or(&[][..], |v| v), 50.0)
    };
    let lvm_rate = args.lifecycles as f64 / lvm_wall.as_secs_f64();
    let loop_rate = args.lifecycles as f64 / loop_wall.as_secs_f64();
    println!("ratios (LVM vs loop, same run):");
    println!(
        "  lifecycle p50: {:.1} ms vs {:.1} ms  -> {:.2}x slower",
        super::ms(p50(&lvm)),
        super::ms(p50(&looped)),
        p50(&lvm).as_secs_f64() / p50(&looped).as_secs_f64().max(1e-9)
    );
    println!(
        "  lifecycles/s: {lvm_rate:.1} vs {loop_rate:.1}  -> {:.2}x",
        lvm_rate / loop_rate
    );
    Ok(())
}

pub(super) async fn start_lvm_driver(
    dir: &Path,
    vg: &str,
    metrics: std::net::SocketAddr,
) -> anyhow::Result<DriverProcess> {
    let endpoint = format!("unix://{}", dir.join("csi.sock").display());
    let mut child = Command::new(std::env::current_exe()?)
        .args(["driver", "--backend", "lvm", "--node-id", "bench"])
        .arg("--endpoint")
        .arg(&endpoint)
        .arg("--volume-group")
        .arg(vg)
        .arg("--lock-dir")
        .arg(dir.join("locks"))
        .arg("--kubelet-dir")
        .arg(dir)
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .context("start kennel driver --backend lvm")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the LVM driver exited with {status} before serving");
        }
        if let Ok(client) = CsiClient::connect(&endpoint).await {
            return Ok(DriverProcess { child, client });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the LVM driver did not come up on {endpoint}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The driver's /metrics page.
pub(super) async fn metrics_text(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    Ok(raw)
}

/// `kennel_lvm_commands_total` by command, from the driver's /metrics.
async fn lvm_commands(addr: std::net::SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    Ok(metrics_text(addr)
        .await?
        .lines()
        .filter_map(|l| l.strip_prefix("kennel_lvm_commands_total{command=\""))
        .filter_map(|rest| {
            let (command, value) = rest.split_once("\"} ")?;
            Some((command.to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}

/// A VG on a sparse file behind a loop device; removed on drop.
pub(super) struct ThrowawayVg {
    name: String,
    pv: PathBuf,
    lvm: Lvm,
}

impl ThrowawayVg {
    /// With `metadata_size`, the PV gets a metadata area of that size.
    fn create(dir: &Path, bytes: u64, metadata_size: Option<u64>) -> anyhow::Result<Self> {
        let image = dir.join("bench-pv.img");
        std::fs::File::create(&image)?.set_len(bytes)?;
        let pv = loopdev::attach(
            &image,
            loopdev::Window {
                offset: 0,
                size_limit: 0,
            },
        )?;
        let lvm = Lvm::new(
            !device_mapper_available(),
            !Path::new("/run/udev/control").exists(),
        );
        let vg = ThrowawayVg {
            name: format!("kennel-bench-{}", std::process::id()),
            pv,
            lvm,
        };
        let pv_name = vg.pv.display().to_string();
        let mut pvcreate = vg.lvm.cmd("pvcreate").arg("-y");
        if let Some(size) = metadata_size {
            pvcreate = pvcreate.arg("--metadatasize").arg(format!("{size}b"));
        }
        pvcreate.arg(&pv_name).run()?;
        vg.lvm
            .cmd("vgcreate")
            .args([vg.name.as_str(), &pv_name])
            .run()?;
        ensure!(!vg.name.is_empty(), "no VG name");
        Ok(vg)
    }
}

impl Drop for ThrowawayVg {
    fn drop(&mut self) {
        if let Ok(windows) = loopdev::find_attached(&self.pv) {
            for window in windows {
                let _ = loopdev::detach(&window.device);
            }
        }
        if device_mapper_available() {
            let _ = self.lvm.cmd("vgchange").args(["-an", &self.name]).run();
        }
        let _ = self
            .lvm
            .cmd("vgremove")
            .args(["-ff", "-y", &self.name])
            .run();
        let pv = self.pv.display().to_string();
        let _ = self.lvm.cmd("pvremove").args(["-ff", "-y", &pv]).run();
        let _ = loopdev::detach(&self.pv);
    }
}
