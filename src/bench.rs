//! `kennel bench`: volume lifecycles against a real driver process, with a
//! baseline measured in the same run.
//!
//! The baseline performs the same lifecycle the way the CSI host-path driver
//! does it for Block volumes: `fallocate`, `losetup --find --show`,
//! `mount --bind`, `umount`, `losetup --detach`, `rm` — one tool process per
//! step. Kennel is reported as ratios against it, plus its idle memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tokio::sync::Mutex;

use crate::csi::client::CsiClient;
use crate::csi::pb::{self, volume_capability as vc};
use crate::model::volume_size::{parse_size, MIB};
use crate::node::{cleanup, shared_mount};

pub mod crowd;
mod lvm_lifecycles;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Lifecycles to run in each measurement.
    #[arg(long, default_value_t = 200)]
    pub lifecycles: usize,
    /// Volumes in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Volume size.
    #[arg(long, value_parser = parse_size, default_value = "64Mi")]
    pub size: u64,
    /// Filesystem volumes (ext4) instead of raw Block volumes.
    #[arg(long)]
    pub filesystem: bool,
    /// Compare against a node crowded with N more loop devices and N more mounts.
    #[arg(long, value_name = "N")]
    pub crowd: Option<usize>,
    /// loop: against the host-path style baseline; lvm: an LVM driver on a
    /// throwaway volume group, beside the loop backend.
    #[arg(long, value_enum, default_value = "loop")]
    pub backend: BenchBackend,
    /// With --backend lvm: fill the volume group with N volumes first, then
    /// report lvm2's call time and the VG's metadata use at that scale.
    #[arg(long, value_name = "N")]
    pub volumes: Option<usize>,
    /// With --volumes: the PV's lvm2 metadata area (`pvcreate --metadatasize`);
    /// lvm2's default (1020 KiB) otherwise.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub metadata_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    Loop,
    Lvm,
}

type Samples = Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>;

const STEPS: [&str; 6] = [
    "create",
    "stage",
    "publish",
    "unpublish",
    "unstage",
    "delete",
];

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark attaches loop devices: run it as root"
    );
    ensure!(
        args.concurrency > 0 && args.lifecycles > 0,
        "--lifecycles and --concurrency must be positive"
    );
    let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("kennel-bench-XXXXXX"))?;
    // The driver serves only a kubelet directory on a shared mount: this one.
    let (result, kubelet) = match shared_mount::SharedMount::new(&dir) {
        Ok(kubelet) => match args.crowd {
            Some(n) => (crowd::run(&args, n, &dir).await, Some(kubelet)),
            None => match args.backend {
                BenchBackend::Loop => (measure(&args, &dir).await, Some(kubelet)),
                BenchBackend::Lvm => (lvm_lifecycles::measure(&args, &dir).await, Some(kubelet)),
            },
        },
        Err(e) => (Err(e.into()), None),
    };
    let cleaned = cleanup::release_all_under(&dir);
    drop(kubelet);
    let _ = std::fs::remove_dir_all(&dir);
    cleaned?;
    result
}

async fn measure(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    let kind = if args.filesystem {
        "ext4 Filesystem"
    } else {
        "Block"
    };
    println!(
        "kennel bench: {} lifecycles of a {} MiB {kind} volume, {} at a time",
        args.lifecycles,
        args.size / MIB,
        args.concurrency
    );
    let mut driver = DriverProcess::start(dir, args.size * args.concurrency as u64 * 2).await?;
    let idle_rss = driver.rss_kib()?;
    let round_trip = probe_round_trip(&driver.client).await?;

    // Warm up once so that first-use costs (loop device creation) are not measured.
    run_lifecycles(args, 1, |i, s| {
        kennel_lifecycle(
            driver.client.clone(),
            dir.to_owned(),
            args.size,
            args.filesystem,
            i,
            s,
        )
    })
    .await?;
    let (kennel, kennel_wall) = run_lifecycles(args, args.lifecycles, |i, s| {
        kennel_lifecycle(
            driver.client.clone(),
            dir.to_owned(),
            args.size,
            args.filesystem,
            i,
            s,
        )
    })
    .await?;
    let loaded_rss = driver.rss_kib()?;
    driver.stop();

    let baseline_args = BenchArgs {
        filesystem: false,
        ..*args
    };
    let (baseline, baseline_wall) = run_lifecycles(&baseline_args, args.lifecycles, |i, s| {
        tool_lifecycle(dir.to_owned(), args.size, i, s)
    })
    .await?;

    report(
        "kennel (gRPC over the Unix socket)",
        &kennel,
        kennel_wall,
        args.lifecycles,
    );
    report(
        "baseline (host-path style: one tool process per step)",
        &baseline,
        baseline_wall,
        args.lifecycles,
    );
    let p50 = |m: &BTreeMap<&str, Vec<Duration>>| {
        percentile(m.get("lifecycle").map_or(&[][..], |v| v), 50.0)
    };
    let kennel_rate = args.lifecycles as f64 / kennel_wall.as_secs_f64();
    let baseline_rate = args.lifecycles as f64 / baseline_wall.as_secs_f64();
    println!("\nratios (kennel vs baseline, same run):");
    println!(
        "  lifecycle p50: {:.1} ms vs {:.1} ms  -> speed-up {:.2}x",
        ms(p50(&kennel)),
        ms(p50(&baseline)),
        p50(&baseline).as_secs_f64() / p50(&kennel).as_secs_f64().max(1e-9)
    );
    println!(
        "  lifecycles/s: {kennel_rate:.1} vs {baseline_rate:.1}  -> {:.2}x",
        kennel_rate / baseline_rate
    );
    println!(
        "gRPC round trip (Probe over the socket, p50): {:.3} ms",
        ms(round_trip)
    );
    println!(
        "driver RSS: {:.1} MiB idle, {:.1} MiB after the run",
        idle_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0
    );
    Ok(())
}

/// The transport's share of every call: an RPC that does no work.
async fn probe_round_trip(client: &CsiClient) -> anyhow::Result<Duration> {
    let mut identity = client.identity.clone();
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let at = Instant::now();
        identity.probe(pb::ProbeRequest {}).await?;
        samples.push(at.elapsed());
    }
    Ok(percentile(&samples, 50.0))
}

async fn run_lifecycles<F, Fut>(
    args: &BenchArgs,
    count: usize,
    lifecycle: F,
) -> anyhow::Result<(BTreeMap<&'static str, Vec<Duration>>, Duration)>
where
    F: Fn(usize, Samples) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let samples: Samples = Arc::default();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = semaphore.clone().acquire_owned().await?;
        let work = lifecycle(i, samples.clone());
        tasks.push(tokio::spawn(async move {
            let result = work.await;
            drop(permit);
            result
        }));
    }
    for task in tasks {
        task.await??;
    }
    let wall = started.elapsed();
    let samples = Arc::try_unwrap(samples).map_err(|_| anyhow::anyhow!("samples still shared"))?;
    Ok((samples.into_inner(), wall))
}

async fn timed<T, E: Into<anyhow::Error>>(
    samples: &Samples,
    step: &'static str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    let at = Instant::now();
    let out = work
        .await
        .map_err(Into::into)
        .with_context(|| format!("{step} failed"))?;
    samples
        .lock()
        .await
        .entry(step)
        .or_default()
        .push(at.elapsed());
    Ok(out)
}

fn capability(filesystem: bool) -> pb::VolumeCapability {
    let access_type = if filesystem {
        vc::AccessType::Mount(vc::MountVolume::default())
    } else {
        vc::AccessType::Block(vc::BlockVolume {})
    };
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

async fn kennel_lifecycle(
    client: CsiClient,
    dir: PathBuf,
    size: u64,
    filesystem: bool,
    i: usize,
    samples: Samples,
) -> anyhow::Result<()> {
    let (mut controller, mut node) = (client.controller, client.node);
    let staging = dir.join(format!("k-stage-{i}"));
    let target = dir.join(format!("k-pods/{i}/volume"));
    std::fs::create_dir_all(&staging)?;
    let cap = capability(filesystem);
    let started = Instant::now();
    let volume = timed(&samples, "create", async {
        controller
            .create_volume(pb::CreateVolumeRequest {
                name: format!("bench-{i}"),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: size as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .context("no volume")
    })
    .await?;
    let id = volume.volume_id;
    let staging_path = staging.display().to_string();
    let target_path = target.display().to_string();
    timed(
        &samples,
        "stage",
        node.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging_path.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }),
    )
    .await?;
    timed(
        &samples,
        "publish",
        node.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging_path.clone(),
            target_path: target_path.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }),
    )
    .await?;
    timed(
        &samples,
        "unpublish",
        node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target_path.clone(),
        }),
    )
    .await?;
    timed(
        &samples,
        "unstage",
        node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging_path.clone(),
        }),
    )
    .await?;
    timed(
        &samples,
        "delete",
        controller.delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }),
    )
    .await?;
    samples
        .lock()
        .await
        .entry("lifecycle")
        .or_default()
        .push(started.elapsed());
    Ok(())
}

/// The same Block lifecycle through command-line tools.
async fn tool_lifecycle(dir: PathBuf, size: u64, i: usize, samples: Samples) -> anyhow::Result<()> {
    let image = dir.join(format!("baseline-{i}.img"));
    let target = dir.join(format!("b-pods/{i}/volume"));
    let started = Instant::now();
    timed(
        &samples,
        "create",
        tool(&[
            "fallocate",
            "-l",
            &size.to_string(),
            &image.display().to_string(),
        ]),
    )
    .await?;
    let device = timed(
        &samples,
        "stage",
        tool(&[
            "losetup",
            "--find",
            "--show",
            "--direct-io=on",
            &image.display().to_string(),
        ]),
    )
    .await?;
    timed(&samples, "publish", async {
        std::fs::create_dir_all(target.parent().context("no parent")?)?;
        std::fs::File::create(&target)?;
        tool(&[
            "mount",
            "--bind",
            device.trim(),
            &target.display().to_string(),
        ])
        .await
    })
    .await?;
    timed(
        &samples,
        "unpublish",
        tool(&["umount", &target.display().to_string()]),
    )
    .await?;
    timed(
        &samples,
        "unstage",
        tool(&["losetup", "--detach", device.trim()]),
    )
    .await?;
    timed(
        &samples,
        "delete",
        tool(&["rm", "-f", &image.display().to_string()]),
    )
    .await?;
    samples
        .lock()
        .await
        .entry("lifecycle")
        .or_default()
        .push(started.elapsed());
    Ok(())
}

async fn tool(argv: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        argv[0],
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(title: &str, samples: &BTreeMap<&str, Vec<Duration>>, wall: Duration, count: usize) {
    println!("\n{title}");
    println!("  {:<10} {:>10} {:>10}", "step", "p50 ms", "p99 ms");
    for step in STEPS.iter().chain(std::iter::once(&"lifecycle")) {
        let values = samples.get(step).map_or(&[][..], |v| v);
        println!(
            "  {step:<10} {:>10.2} {:>10.2}",
            ms(percentile(values, 50.0)),
            ms(percentile(values, 99.0))
        );
    }
    println!(
        "  {:.1} lifecycles/s ({count} in {:.2} s)",
        count as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
}

/// A `kennel driver` child process on a temporary socket.
struct DriverProcess {
    child: Child,
    client: CsiClient,
}

impl DriverProcess {
    async fn start(dir: &Path, capacity: u64) -> anyhow::Result<Self> {
        let socket = dir.join("csi.sock");
        let endpoint = format!("unix://{}", socket.display());
        let child = Command::new(std::env::current_exe()?)
            .args([
                "driver",
                "--endpoint",
                &endpoint,
                "--node-id",
                "bench",
                "--reserve",
                "0",
            ])
            .arg("--loop-dir")
            .arg(dir.join("loop"))
            .arg("--kubelet-dir")
            .arg(dir)
            .args(["--capacity", &capacity.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("start kennel driver")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = CsiClient::connect(&endpoint).await {
                return Ok(DriverProcess { child, client });
            }
            ensure!(
                Instant::now() < deadline,
                "driver did not come up on {endpoint}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("VmRSS missing")
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
