//! `kennel demo`: the StatefulSet walk-through on this machine, no cluster.
//!
//! A `webserver` StatefulSet with three replicas gets one volume per pod
//! (`www-webserver-0..2`). webserver-2 writes hello.txt, the set scales down
//! to two (the volume is retained), scales back to three, and webserver-2
//! finds its file again. Every step goes through the real driver over its
//! socket, exactly as the kubelet and csi-provisioner would call it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};

use crate::backend::loop_files::Provisioning;
use crate::csi::client::CsiClient;
use crate::csi::pb::{self, volume_capability as vc};
use crate::driver::{DriverArgs, LocalDriver};
use crate::model::spec::{PARAM_PVC_NAME, PARAM_PVC_NAMESPACE};
use crate::model::volume_size::MIB;
use crate::node::{cleanup, shared_mount};

const REPLICAS: usize = 3;
const VOLUME_BYTES: u64 = 64 * MIB;
const GREETING: &str = "hello from webserver-2\n";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the temporary directory (volumes are still cleaned up).
    #[arg(long)]
    pub keep_dir: bool,
}

/// Prints each step and how long it took.
struct Steps {
    started: Instant,
}

impl Steps {
    async fn run<T, F>(&self, title: &str, step: F) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = anyhow::Result<T>>,
    {
        let at = Instant::now();
        let result = step.await;
        let mark = if result.is_ok() { "ok " } else { "ERR" };
        println!(
            "  [{mark}] {title:<58} {:>8.1} ms",
            at.elapsed().as_secs_f64() * 1000.0
        );
        result
    }
}

struct Pod {
    name: String,
    volume_id: String,
    staging: PathBuf,
    target: PathBuf,
}

fn mount_capability() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo attaches loop devices and mounts filesystems: run it as root"
    );
    let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("kennel-demo-XXXXXX"))
        .context("create temp dir")?;
    println!("Kennel demo: a webserver StatefulSet with one local volume per pod");
    println!("  working directory {}", dir.display());
    // The kubelet directory below it must be a shared mount, as on a node.
    let (outcome, kubelet) = match shared_mount::SharedMount::new(&dir.join("kubelet")) {
        Ok(kubelet) => (walk_through(&dir).await, Some(kubelet)),
        Err(e) => (Err(e.into()), None),
    };
    // Whatever happened, leave no mount or loop device behind.
    let cleaned = cleanup::release_all_under(&dir);
    drop(kubelet);
    if !args.keep_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome?;
    cleaned.context("cleaning up")?;
    Ok(())
}

async fn walk_through(dir: &Path) -> anyhow::Result<()> {
    let steps = Steps {
        started: Instant::now(),
    };
    let args = DriverArgs::in_dir(
        dir,
        "demo-node",
        REPLICAS as u64 * VOLUME_BYTES * 2,
        Provisioning::Preallocated,
    );
    let endpoint = args.endpoint.clone();
    let server = steps
        .run("start kennel driver on a temporary socket", async {
            Ok(LocalDriver::start(&args).await?)
        })
        .await?;
    let result = scenario(&steps, dir, &endpoint).await;
    server.stop().await?;
    match &result {
        Ok(()) => println!(
            "PASS: webserver-2 found its hello.txt after scaling 3 -> 2 -> 3 ({:.0} ms in all)",
            steps.started.elapsed().as_secs_f64() * 1000.0
        ),
        Err(e) => println!("FAIL: {e:#}"),
    }
    result
}

async fn scenario(steps: &Steps, dir: &Path, endpoint: &str) -> anyhow::Result<()> {
    let client = Arc::new(CsiClient::connect(endpoint).await?);
    let info = client
        .identity
        .clone()
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await?
        .into_inner();
    println!("  driver {} {}", info.name, info.vendor_version);

    let mut pods = Vec::new();
    for ordinal in 0..REPLICAS {
        let pod = format!("webserver-{ordinal}");
        let claim = format!("www-{pod}");
        let volume = steps
            .run(
                &format!("provision claim {claim}"),
                provision(&client, &claim),
            )
            .await?;
        pods.push(Pod {
            staging: dir.join(format!(
                "kubelet/plugins/kubernetes.io/csi/kennel.csi.dev/{claim}/globalmount"
            )),
            target: dir.join(format!(
                "kubelet/pods/{pod}-uid1/volumes/kubernetes.io~csi/{claim}/mount"
            )),
            name: pod,
            volume_id: volume.volume_id,
        });
    }
    for pod in &pods {
        steps
            .run(
                &format!("start {}: stage + publish its volume", pod.name),
                attach_pod(&client, pod),
            )
            .await?;
    }

    let web2 = &pods[2];
    steps
        .run("webserver-2 writes hello.txt", async {
            let path = web2.target.join("hello.txt");
            let mut file = std::fs::File::create(&path).context("create hello.txt")?;
            std::io::Write::write_all(&mut file, GREETING.as_bytes()).context("write hello.txt")?;
            file.sync_all().context("fsync hello.txt")?;
            Ok(())
        })
        .await?;

    steps
        .run(
            "scale 3 -> 2: webserver-2 stops (unpublish + unstage)",
            detach_pod(&client, web2),
        )
        .await?;
    steps
        .run("the claim is retained: volume still listed", async {
            let list = client
                .controller
                .clone()
                .list_volumes(pb::ListVolumesRequest::default())
                .await?
                .into_inner();
            let listed = list
                .entries
                .iter()
                .filter_map(|e| e.volume.as_ref())
                .any(|v| v.volume_id == web2.volume_id);
            ensure!(
                listed,
                "volume {} vanished after scale-down",
                web2.volume_id
            );
            ensure!(
                !web2.target.join("hello.txt").exists(),
                "pod directory still mounted"
            );
            Ok(())
        })
        .await?;

    let reborn = Pod {
        target: dir
            .join("kubelet/pods/webserver-2-uid2/volumes/kubernetes.io~csi/www-webserver-2/mount"),
        name: web2.name.clone(),
        volume_id: web2.volume_id.clone(),
        staging: web2.staging.clone(),
    };
    steps
        .run(
            "scale 2 -> 3: webserver-2 is back with the same volume",
            attach_pod(&client, &reborn),
        )
        .await?;
    steps
        .run("webserver-2 reads hello.txt", async {
            let text = std::fs::read_to_string(reborn.target.join("hello.txt"))
                .context("read hello.txt")?;
            ensure!(
                text == GREETING,
                "hello.txt holds {text:?}, expected {GREETING:?}"
            );
            println!("        hello.txt: {}", text.trim_end());
            Ok(())
        })
        .await?;

    for pod in pods.iter().take(2).chain(std::iter::once(&reborn)) {
        steps
            .run(
                &format!("delete {}: unpublish, unstage, delete volume", pod.name),
                async {
                    detach_pod(&client, pod).await?;
                    client
                        .controller
                        .clone()
                        .delete_volume(pb::DeleteVolumeRequest {
                            volume_id: pod.volume_id.clone(),
                            ..Default::default()
                        })
                        .await?;
                    Ok(())
                },
            )
            .await?;
    }
    steps
        .run("nothing left behind: no mounts, no loop devices", async {
            // The kubelet directory's own shared mount is the demo's, not a volume's.
            let kubelet = dir.join("kubelet");
            let mounts: Vec<_> = cleanup::mounts_under(dir)?
                .into_iter()
                .filter(|point| *point != kubelet)
                .collect();
            let loops = cleanup::loops_under(dir)?;
            if !mounts.is_empty() || !loops.is_empty() {
                bail!("leaked mounts {mounts:?}, loop devices {loops:?}");
            }
            Ok(())
        })
        .await
}

async fn provision(client: &CsiClient, claim: &str) -> anyhow::Result<pb::Volume> {
    let response = client
        .controller
        .clone()
        .create_volume(pb::CreateVolumeRequest {
            name: format!("pvc-{claim}"),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: VOLUME_BYTES as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability()],
            parameters: [
                (PARAM_PVC_NAME.to_owned(), claim.to_owned()),
                (PARAM_PVC_NAMESPACE.to_owned(), "default".to_owned()),
            ]
            .into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    response.volume.context("CreateVolume returned no volume")
}

async fn attach_pod(client: &CsiClient, pod: &Pod) -> anyhow::Result<()> {
    let mut node = client.node.clone();
    node.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: pod.volume_id.clone(),
        staging_target_path: pod.staging.display().to_string(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    })
    .await?;
    node.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: pod.volume_id.clone(),
        staging_target_path: pod.staging.display().to_string(),
        target_path: pod.target.display().to_string(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    })
    .await?;
    Ok(())
}

async fn detach_pod(client: &CsiClient, pod: &Pod) -> anyhow::Result<()> {
    let mut node = client.node.clone();
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: pod.volume_id.clone(),
        target_path: pod.target.display().to_string(),
    })
    .await?;
    node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: pod.volume_id.clone(),
        staging_target_path: pod.staging.display().to_string(),
    })
    .await?;
    Ok(())
}
