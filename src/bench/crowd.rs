//! `kennel bench --crowd N`: the same lifecycles on this node as it is and
//! crowded with N loop devices and N bind mounts that are none of Kennel's,
//! in one run, with the ratio and the sysfs and mountinfo reads each
//! lifecycle cost. Kennel's cost must not grow with the host's devices and
//! mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{kennel_lifecycle, ms, percentile, report, run_lifecycles, BenchArgs};
use crate::backend::loop_files::Provisioning;
use crate::driver::{DriverArgs, LocalDriver};
use crate::model::volume_size::MIB;
use crate::node::{loopdev, mount as mounts};

/// First device number tried for the crowd's loop devices: far above the
/// ones the kernel hands out first, so Kennel's own attachments do not
/// depend on the crowd.
const FIRST_NUMBER: u32 = 50_000;

/// Loop devices and bind mounts that belong to nobody, removed on drop.
pub struct Crowd {
    dir: PathBuf,
    /// Device numbers this crowd created (attached or not).
    created: Vec<u32>,
    attached: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
}

impl Crowd {
    /// `n` loop devices (half attached to scratch images outside any Kennel
    /// directory, half unbound) and `n` private bind mounts.
    pub fn create(n: usize) -> anyhow::Result<Crowd> {
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("kennel-crowd-XXXXXX"))
            .context("create crowd dir")?;
        let mut crowd = Crowd {
            dir,
            created: Vec::with_capacity(n),
            attached: Vec::new(),
            mounts: Vec::with_capacity(n),
        };
        let root = crowd.dir.clone();
        let mut number = FIRST_NUMBER;
        while crowd.created.len() < n {
            number += 1;
            let device = match loopdev::add_device(number) {
                Ok(device) => device,
                // Taken already: someone else's device, not ours to remove.
                Err(crate::error::Error::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EEXIST) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            crowd.created.push(number);
            if crowd.created.len().is_multiple_of(2) {
                let image = root.join(format!("scratch-{number}.img"));
                fs::File::create(&image)?.set_len(MIB)?;
                loopdev::attach_to(&device, &image)?;
                crowd.attached.push(device);
            }
        }
        let source = root.join("source");
        fs::create_dir_all(&source)?;
        for i in 0..n {
            let point = root.join(format!("mnt-{i}"));
            fs::create_dir_all(&point)?;
            mount(
                Some(&source),
                &point,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind mount {}", point.display()))?;
            crowd.mounts.push(point.clone());
            // Private: no mount elsewhere propagates into the crowd.
            mount(
                None::<&str>,
                &point,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
        }
        Ok(crowd)
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        for point in self.mounts.iter().rev() {
            if umount2(point, MntFlags::empty()).is_err() {
                eprintln!("warning: could not unmount {}", point.display());
            }
        }
        for device in &self.attached {
            if let Err(e) = loopdev::detach(device) {
                eprintln!("warning: {e}");
            }
        }
        for number in &self.created {
            if let Err(e) = loopdev::remove_device(*number) {
                eprintln!("warning: {e}");
            }
        }
        let mounted = mounts::mounts()
            .map(|all| all.iter().any(|m| m.mount_point.starts_with(&self.dir)))
            .unwrap_or(true);
        // Never delete through a mount that is still there.
        if !mounted {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One measured run and what it read from sysfs and mountinfo.
struct Run {
    lifecycles_per_s: f64,
    lifecycle_p50: Duration,
    stage_p50: Duration,
    sysfs_reads: f64,
    mountinfo_reads: f64,
}

async fn measure_run(
    title: &str,
    args: &BenchArgs,
    driver: &crate::csi::client::CsiClient,
    kubelet: &Path,
) -> anyhow::Result<Run> {
    let (sysfs_before, mountinfo_before) = (loopdev::sysfs_reads(), mounts::mountinfo_reads());
    let (samples, wall) = run_lifecycles(args, args.lifecycles, |i, s| {
        kennel_lifecycle(
            driver.clone(),
            kubelet.to_owned(),
            args.size,
            args.filesystem,
            i,
            s,
        )
    })
    .await?;
    let per_lifecycle = |after: u64, before: u64| (after - before) as f64 / args.lifecycles as f64;
    let run = Run {
        lifecycles_per_s: args.lifecycles as f64 / wall.as_secs_f64(),
        lifecycle_p50: percentile(samples.get("lifecycle").map_or(&[][..], |v| v), 50.0),
        stage_p50: percentile(samples.get("stage").map_or(&[][..], |v| v), 50.0),
        sysfs_reads: per_lifecycle(loopdev::sysfs_reads(), sysfs_before),
        mountinfo_reads: per_lifecycle(mounts::mountinfo_reads(), mountinfo_before),
    };
    report(title, &samples, wall, args.lifecycles);
    println!(
        "  per lifecycle: {:.1} sysfs reads, {:.1} mountinfo reads",
        run.sysfs_reads, run.mountinfo_reads
    );
    Ok(run)
}

/// Clean node, then the same node crowded with `n` devices and mounts.
pub async fn run(args: &BenchArgs, n: usize, dir: &Path) -> anyhow::Result<()> {
    let kind = if args.filesystem {
        "ext4 Filesystem"
    } else {
        "Block"
    };
    println!(
        "kennel bench --crowd {n}: {} lifecycles of a {} MiB {kind} volume, {} at a time, \
         on a clean node and on one with {n} more loop devices and {n} more mounts",
        args.lifecycles,
        args.size / MIB,
        args.concurrency
    );
    // In this process, so that the driver's own read counters are visible.
    let driver_args = DriverArgs::in_dir(
        dir,
        "bench-crowd",
        args.size * args.concurrency as u64 * 2,
        Provisioning::Preallocated,
    );
    let kubelet = driver_args.kubelet_dir.clone();
    fs::create_dir_all(&kubelet)?;
    let server = LocalDriver::start(&driver_args).await?;
    let outcome = async {
        let client = crate::csi::client::CsiClient::connect(&driver_args.endpoint).await?;
        // Warm up once so that first-use costs are not measured.
        let warm_up = BenchArgs {
            lifecycles: 1,
            ..*args
        };
        run_lifecycles(&warm_up, 1, |i, s| {
            kennel_lifecycle(
                client.clone(),
                kubelet.clone(),
                args.size,
                args.filesystem,
                i,
                s,
            )
        })
        .await?;
        let clean = measure_run("clean node", args, &client, &kubelet).await?;
        let crowd = Crowd::create(n)?;
        let crowded = measure_run(
            &format!("crowded node (+{n} loop devices, +{n} mounts)"),
            args,
            &client,
            &kubelet,
        )
        .await;
        drop(crowd);
        let crowded = crowded?;
        println!("\ncrowded vs clean (same run):");
        println!(
            "  lifecycles/s: {:.1} vs {:.1} -> {:.0}%",
            crowded.lifecycles_per_s,
            clean.lifecycles_per_s,
            100.0 * crowded.lifecycles_per_s / clean.lifecycles_per_s
        );
        println!(
            "  lifecycle p50: {:.2} ms vs {:.2} ms",
            ms(crowded.lifecycle_p50),
            ms(clean.lifecycle_p50)
        );
        println!(
            "  NodeStage p50: {:.2} ms vs {:.2} ms ({:+.2} ms)",
            ms(crowded.stage_p50),
            ms(clean.stage_p50),
            ms(crowded.stage_p50) - ms(clean.stage_p50)
        );
        println!(
            "  per lifecycle: {:.1} vs {:.1} sysfs reads, {:.1} vs {:.1} mountinfo reads",
            crowded.sysfs_reads, clean.sysfs_reads, crowded.mountinfo_reads, clean.mountinfo_reads
        );
        anyhow::Ok(())
    }
    .await;
    server.stop().await?;
    outcome
}
